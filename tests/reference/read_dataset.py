"""Reads a drllm paths dataset the way users do (pandas, Polars and Hugging Face `datasets` through
the dataset card, unchanged calls) and prints what the Rust test checks: row counts, column types,
and the rows as JSON."""
import json
import os
import sys

import datasets

import pandas as pd
import polars as pl

out = sys.argv[1]
pdf = pd.read_parquet(f"{out}/data")
plf = pl.scan_parquet(f"{out}/data/**/*.parquet", hive_partitioning=True).collect()


def pd_rows(df):
    rows = []
    for r in df.to_dict(orient="records"):
        row = {}
        for k, v in r.items():
            if hasattr(v, "tolist"):
                v = v.tolist()
            if isinstance(v, list):
                v = [x.tolist() if hasattr(x, "tolist") else x for x in v]
            if isinstance(v, float) and v != v:
                v = None
            # numpy-backed pandas turns a nullable integer column with nulls into float64.
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            row[k] = v if not hasattr(v, "item") else v.item()
        row["task"] = str(row["task"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["sample_id"]))




def hf_config(name):
    """One config of the card, loaded offline into a cache beside the dataset."""
    ds = datasets.load_dataset(out, name, cache_dir=os.path.join(os.path.dirname(out), "hf-cache"))
    (split, d), = ds.items()
    rows = [dict(r) for r in d]
    return {"split": split, "rows": len(d), "features": {k: str(v) for k, v in d.features.items()},
            "data": sorted(rows, key=lambda r: (r.get("task", ""), r["sample_id"]))}


configs = datasets.get_dataset_config_names(out)
print(json.dumps({
    "datasets": {"configs": configs, **{c: hf_config(c) for c in configs}},
    "pandas": {
        "rows": len(pdf),
        "dtypes": {c: str(t) for c, t in pdf.dtypes.items()},
        "data": pd_rows(pdf),
    },
    "polars": {
        "rows": plf.height,
        "dtypes": {c: str(t) for c, t in plf.schema.items()},
        "data": sorted(plf.to_dicts(), key=lambda r: (r["task"], r["sample_id"])),
    },
}, default=str))
