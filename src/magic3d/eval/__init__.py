"""The toy-world evaluator: scores text-to-3D runs and diffusion priors against ground truth.

``python -m magic3d.eval`` (``__main__``) is the command line. Modules, by purpose:

- ``options``: :class:`EvalOptions` and the metric keys every report shares;
- ``views``: the orbit cameras and object-only renders of a scene;
- ``metrics``: pure metric functions (prompt parsing, classifier metrics, IoU, Chamfer, surfaces);
- ``chamfer``: a scene's surface against the ground truth's;
- ``scene``: every metric for one scene (``evaluate_scene``);
- ``stage``: one stage folder of a run (``evaluate_stage``);
- ``compare``: a stage against the stage it started from (fine - coarse);
- ``run``: one run folder (``evaluate_run``) -> ``<run>/eval/``;
- ``aggregate``: every run under a folder (``aggregate_runs``) -> ``eval_summary.*``;
- ``markdown``, ``contact_sheet``: the reports' tables and pictures;
- ``prior``, ``prior_report``: sampling and scoring a prior (``evaluate_prior``) and its reports;
- ``classifier``, ``train_classifier``: the evaluator CNN and its training;
- ``robustness``: its accuracy on ground truth degraded as text-to-3D renders are.

Nothing here is imported by the training path; this package may import it.
"""
