"""Ray job: Osprey stage 1, image-text alignment (the projector learns).

ray job submit --working-dir . -- python -m jobs.train_stage1 --config tiny/stage1
"""

from osprey.train.entry import stage_main

if __name__ == "__main__":
    stage_main("stage1")
