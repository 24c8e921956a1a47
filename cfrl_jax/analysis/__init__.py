"""What a run's outputs say: reading metrics and checkpoints after training, computing apart from rendering.

  rank1                   rank-1 / low-rank maths of weight updates (SVD factors, linear dynamics, AlphaRL's
                          step-line and released PLS fits, ExPO, RELEX), pure numpy
  study_stats             per-seed and paired statistics of a study (steps to target, AUC, t intervals)
  update_dynamics         the update-dynamics analysis of a run's checkpoints (analyze_run)
  update_dynamics_report  its JSON, figures and Markdown (the command is cfrl_jax/analyze.py)
  alpharl_fit             AlphaRL's fit of a window run, the share of the gain and the verdicts
  alpharl_report          an AlphaRL result's Markdown, figure and JSON (the run mode is cfrl_jax/alpharl.py)
  report_runs             loading a run or a study's metrics streams
  report_numbers          the report's numbers: curves over seeds, summaries, paired comparisons
  report_findings         the sentences those numbers support
  report_figures          the report's figures
  report_markdown         report.md and the README block (the command is cfrl_jax/report.py)
"""
