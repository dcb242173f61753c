"""The training stages, one module each: pretrain -> sft -> reward -> rlhf (ppo, dpo), the
pipeline that runs them all, and the human-feedback store. Stages use the library (core.trainer,
core.data, core.chat_format, core.losses, core.generate); no stage imports another for a helper."""
