"""Ray job: Osprey stage 3, end-to-end (all but the vision tower learn).

ray job submit --working-dir . -- python -m jobs.train_stage3 --config tiny/stage3
"""

from osprey.train.entry import stage_main

if __name__ == "__main__":
    stage_main("stage3")
