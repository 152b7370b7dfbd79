"""`posttrain examples`: the user's success examples (math RL, code RL, game RL, instruction SFT, chat SFT,
distillation, DPO), each reproduced by one command, in the document's shape: base -> trained on held-out data.

An example is a few `posttrain train` runs (stages) with fixed settings; a later stage may take an earlier one's
trained model (distillation's teacher is the math-RL run, built first in the same command). Data the example needs
is shipped or generated into its folder. Every stage is a `posttrain train` subprocess, so what the gallery
measures is exactly what a user's command does; each stage keeps its whole results folder under
`<out>/<example>/<stage>/`. `examples all` runs every example and writes the table (`gallery.md`, `gallery.json`):
example, command, base -> trained, the document's target and whether it was met, wall time, processor and date.

Settings given after the names (`key=value`) are added to every stage: the tests run each example for one step on
the tiny model this way.
"""
