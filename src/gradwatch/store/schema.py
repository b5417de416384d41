"""The store's SQLite schema: documented in docs/store.md, readable with any SQL tool."""

FORMAT = "gradwatch-store"
SCHEMA_VERSION = 1
EXIT_KEY = "exit"  # meta: how the command of `gradwatch run` ended, {"code": N} (128+N: signal N)
# meta: the process that wrote the store closed it itself (its last steps flushed): a run whose
# `gradwatch run` was killed alone, its command running on to its end, is whole
CLOSED_KEY = "closed"

# Per-(step, layer) columns, in table order. NULL = not recorded at that step.
LAYER_COLUMNS = (
    "grad_norm",
    "grad_max",
    "weight_norm",
    "update_ratio",
    "nonfinite",
    "grad_out_rms",
    "act_mean",
    "act_std",
    "saturated",
    "dead",
)

DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    idx INTEGER NOT NULL,
    role TEXT NOT NULL,
    n_params INTEGER NOT NULL,
    activation TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY,
    loss REAL,
    lr REAL,
    lrs TEXT,
    wall_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layer_stats (
    step INTEGER NOT NULL,
    layer INTEGER NOT NULL REFERENCES layers(id),
    {", ".join(f"{c} REAL" for c in LAYER_COLUMNS)},
    PRIMARY KEY (step, layer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS time_profile (
    step INTEGER NOT NULL,
    layer INTEGER NOT NULL REFERENCES layers(id),
    t INTEGER NOT NULL,
    grad_norm REAL,
    PRIMARY KEY (step, layer, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
