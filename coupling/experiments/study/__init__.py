"""Controlled studies: model suites trained here with one factor varied at a time, scanned,
and analysed against held-out performance (``coupling study CONFIG``; docs/study.md).

Modules: ``corpus`` (the training text), ``lm_data`` (token streams, multiple-choice set and
tokenizer, built once and shared), ``lm`` (training the causal LMs), ``lm_eval`` (held-out
loss, next-token accuracy, the multiple-choice benchmark), ``vit`` (small ViTs on
scikit-learn's digits), ``stochastic_depth`` (the DeiT/timm drop-path rule as block hooks),
``pruning`` (block skipping), ``config`` (the suite spec), ``runner`` (train -> scan ->
table), ``study_stats`` (the tables' statistics), ``study_figures`` (the figures),
``analyses`` (writes every figure and table).
"""
