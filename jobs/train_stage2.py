"""Ray job: Osprey stage 2, mask-text alignment (the mask extractor learns).

ray job submit --working-dir . -- python -m jobs.train_stage2 --config tiny/stage2
"""

from osprey.train.entry import stage_main

if __name__ == "__main__":
    stage_main("stage2")
