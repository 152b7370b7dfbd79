"""Distillation from a teacher model (`teacher_model=`: a served model or a tinker:// checkpoint).

- off_policy: the teacher answers every prompt (concurrently); the traces are kept under the run's log folder
  (data/teacher_train.jsonl, data/teacher_eval.jsonl) and the student is trained on them with the cookbook's
  supervised loop.
- on_policy: the cookbook's `distillation.train_on_policy`: the student samples, the teacher scores the
  student's tokens, and the per-token reverse KL is the (negative) advantage.

Evaluation (both modes): the NLL of the teacher's completions of the held-out prompts under the student (SFT
rows). on_policy also measures the reverse KL to the teacher on the held-out prompts (summary.json).

Several teachers (`teacher_model=A,B dataset=a,b`), as the cookbook's multi-teacher recipe
(recipes/distillation/on_policy_multi_teacher.py) does: each teacher has its own prompt dataset (a `Share`).
on_policy: one `DistillationDatasetConfig` per teacher, every step takes a share of batch_size prompts from each
dataset, and the cookbook scores each sample with its own dataset's teacher (`teacher_kl/dataset_K` per
teacher). off_policy: each teacher answers its own prompts, the student is trained on all the traces. Each
teacher is evaluated on its own held-out prompts; the overall numbers pool every teacher's held-out prompts.

Teacher and student must render and tokenize alike: the teacher scores the student's token ids, and a
different tokenizer or chat format silently turns that into noise (tinker-cookbook #796). It is checked
before anything is trained.
"""
