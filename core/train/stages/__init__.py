"""The training stages, one module each: pretrain -> sft -> reward -> rlhf (ppo, dpo), the
pipeline that runs them all, and the human-feedback store. Stages use the library (core.train.trainer,
core.train.data, core.lm.chat_format, core.train.losses, core.lm.generate); no stage imports another for a helper."""
