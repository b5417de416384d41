"""integrations: gradwatch where people already look.

- `terminal.StatusLine`: a one-line live status on stderr (only on a terminal).
- `tensorboard.TensorBoardSink` and `tensorboard.export`: scalars per layer and metric, findings as
  text (needs the `tensorboard` package).
- `lightning.GradwatchCallback`, `transformers.GradwatchCallback`: Lightning's and Hugging Face's
  Trainer, recording the same store as `gradwatch.watch` and reporting findings in their loggers.

Each framework is an optional extra (`pip install 'gradwatch[integrations]'`), imported only by
the module that needs it. Nothing else in gradwatch imports this package at import time.
"""
