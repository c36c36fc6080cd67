"""Ray job: fine-tune Osprey (full, LoRA or QLoRA) on your own shards.

ray job submit --working-dir . -- python -m jobs.finetune --model /models/osprey-7b \
    --data /data/my_shards --name my-osprey --method lora
"""

from osprey.train.finetune import finetune_main

if __name__ == "__main__":
    finetune_main()
