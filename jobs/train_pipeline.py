"""Ray job: the three Osprey stages in order, each starting from the previous one's export.

ray job submit --working-dir . -- python -m jobs.train_pipeline --preset tiny --output-dir /shared/run
"""

from osprey.train.entry import pipeline_main

if __name__ == "__main__":
    pipeline_main()
