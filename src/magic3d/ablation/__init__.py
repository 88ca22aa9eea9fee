"""Ablations: variants (a recipe plus overrides) x prompts x seeds, run, evaluated on the toy
world and compared with a baseline (``python -m magic3d ablation``, ``make ablation``).

Modules, by purpose:

- ``spec``: what to run (:class:`AblationSpec`, spec files ``ablations/*.yaml``, checks);
- ``state``: ``ablation.json``, one record per run, written atomically after every change;
- ``runner``: running and resuming the set through the recipe runner (``run_ablation``);
- ``measure``: evaluating a finished run, its orbit strip, the GPUs it held;
- ``stats``: bootstrap means and paired differences (pure numpy);
- ``table``, ``charts``, ``sheets``, ``report``: table.md/.csv/.json, charts/, sheets/.

Not on the training path: this package may import ``magic3d.eval``; nothing in the training
path imports it.
"""
