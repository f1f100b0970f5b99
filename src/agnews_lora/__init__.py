"""agnews-lora: LoRA fine-tuning of pretrained encoders for AG News topic classification.

Importing the package changes nothing global (environment, thread counts, warning filters,
registries): the entry points that need a process-wide setting make it (see `speed.set_kernel_cache`,
`cli.main`).
"""
