"""task=rlhf: RLHF in the cookbook's three stages (tinker_cookbook/recipes/preference/rlhf), as one run on one data
set of chosen/rejected pairs:

1. sft: the policy is fine-tuned on the chosen answers (`supervised.train`);
2. reward_model: a LoRA of the base model learns to name the preferred answer of a pair shown as
   "Completion A / Completion B" (the cookbook's `ChatDatasetBuilderFromComparisons` and comparison renderer,
   trained with `supervised.train`); afterwards its own accuracy on the held-out pairs is measured (both orders);
3. rl: the SFT policy is trained with `rl.train` on the training prompts in the cookbook's pairwise-preference
   environments (`rl.preference_envs`): `group_size` answers per prompt, compared all-pairs-both-ways by the
   reward model, win minus loss is the reward.

Each stage logs to its own folder, results/logs/<run>/{sft,reward_model,rl}/. Steps and learning rates follow
the run's settings: every stage takes num_epochs passes over the training pairs at batch_size (capped by
max_steps); the SFT and reward-model stages use the learning rate, the RL stage half of it (as RL runs do here).
Evaluation (base and trained the same): held-out preference accuracy and mean margin, as for DPO, and the task
accuracy where the pairs carry an answer.

The package: `method` (the settings, the method, its plan and summary), `stages` (what every stage reads; the SFT
stage), `reward_model` (stage 2 and its own evaluation), `policy` (stage 3).
"""

from posttrain.pipeline.methods.rlhf.method import RLHF, RLHFConfig

__all__ = ["RLHF", "RLHFConfig"]
