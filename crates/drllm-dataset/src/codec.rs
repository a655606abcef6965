//! Rows to Arrow record batches and back (the Parquet columns of docs/dataset.md).
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, ListBuilder, StringBuilder, UInt16Builder, UInt32Builder, UInt64Builder,
    UInt8Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type, UInt64Type, UInt8Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema};
use drllm_path::LayerPath;

use crate::*;

/// The Arrow schema of a part file. `task` is not stored in the files: it is the hive partition
/// (`data/task=<task>/`), which readers turn into a column (a column stored in the file as well
/// would clash with it in pyarrow).
pub fn schema() -> Schema {
    let list = |name: &str, item: DataType, nullable: bool| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", item, true))),
            nullable,
        )
    };
    Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("num_layers", DataType::UInt16, false),
        Field::new("default_correct", DataType::Boolean, false),
        Field::new("found", DataType::Boolean, false),
        Field::new("improved", DataType::Boolean, false),
        list("best_path", DataType::UInt8, true),
        Field::new("best_cost", DataType::UInt32, true),
        list("best_layers", DataType::UInt16, true),
        Field::new(
            "good_paths",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::List(Arc::new(Field::new("item", DataType::UInt8, true))),
                true,
            ))),
            false,
        ),
        Field::new("simulations", DataType::UInt32, false),
        Field::new("evaluations", DataType::UInt32, false),
        Field::new("search_ms", DataType::UInt64, false),
        Field::new("worker", DataType::Utf8, false),
        Field::new("seed", DataType::UInt64, false),
        Field::new("best_response", DataType::Utf8, true),
    ])
}

/// Rows as one Arrow record batch of [`schema`].
pub fn to_batch(rows: &[PathRecord]) -> std::result::Result<RecordBatch, ArrowError> {
    let strings = |f: &dyn Fn(&PathRecord) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_option(f(r));
        }
        Arc::new(b.finish())
    };
    let bools = |f: &dyn Fn(&PathRecord) -> bool| -> ArrayRef {
        let mut b = BooleanBuilder::new();
        for r in rows {
            b.append_value(f(r));
        }
        Arc::new(b.finish())
    };
    let mut num_layers = UInt16Builder::new();
    let mut best_path = ListBuilder::new(UInt8Builder::new());
    let mut best_cost = UInt32Builder::new();
    let mut best_layers = ListBuilder::new(UInt16Builder::new());
    let mut good = ListBuilder::new(ListBuilder::new(UInt8Builder::new()));
    let (mut sims, mut evals) = (UInt32Builder::new(), UInt32Builder::new());
    let (mut ms, mut seed) = (UInt64Builder::new(), UInt64Builder::new());
    for r in rows {
        num_layers.append_value(r.num_layers);
        match &r.best_path {
            Some(p) => {
                best_path.values().append_slice(p.counts());
                best_path.append(true);
            }
            None => best_path.append(false),
        }
        best_cost.append_option(r.best_cost());
        match r.best_layers() {
            Some(l) => {
                best_layers.values().append_slice(&l);
                best_layers.append(true);
            }
            None => best_layers.append(false),
        }
        for p in &r.good_paths {
            good.values().values().append_slice(p.counts());
            good.values().append(true);
        }
        good.append(true);
        sims.append_value(r.simulations);
        evals.append_value(r.evaluations);
        ms.append_value(r.search_ms);
        seed.append_value(r.seed);
    }
    let schema = Arc::new(schema());
    // The builders' default item fields already match the schema ("item", nullable).
    let cols: Vec<ArrayRef> = vec![
        strings(&|r| Some(&r.sample_id)),
        strings(&|r| Some(&r.split)),
        strings(&|r| Some(&r.question)),
        strings(&|r| Some(&r.answer)),
        strings(&|r| Some(&r.prompt)),
        strings(&|r| Some(&r.model)),
        Arc::new(num_layers.finish()),
        bools(&|r| r.default_correct),
        bools(&|r| r.found),
        bools(&|r| r.improved),
        Arc::new(best_path.finish()),
        Arc::new(best_cost.finish()),
        Arc::new(best_layers.finish()),
        Arc::new(good.finish()),
        Arc::new(sims.finish()),
        Arc::new(evals.finish()),
        Arc::new(ms.finish()),
        strings(&|r| Some(&r.worker)),
        Arc::new(seed.finish()),
        strings(&|r| r.best_response.as_deref()),
    ];
    RecordBatch::try_new(schema, cols)
}

/// Reads every committed row of the dataset in `out` (parts listed in its manifest, in commit
/// order), e.g. for training or for comparing runs. Every part is checked against its checksums
/// first: a damaged one is refused by name ([`DatasetError::Damaged`]); parts written before
/// checksums are read unverified, with a warning.
pub fn read_rows(out: &Path) -> Result<Vec<PathRecord>> {
    let m = read_manifest(out)?;
    let mut rows = vec![];
    let mut unverified = 0;
    for p in &m.parts {
        let (part, checked) = integrity::check_listed(out, p)?;
        unverified += (checked == Checked::Unverified) as usize;
        rows.extend(part.rows);
    }
    if unverified > 0 {
        tracing::warn!(
            dataset = %out.display(),
            parts = unverified,
            "parts written before checksums (format 1) were read unverified"
        );
    }
    Ok(rows)
}

/// Rows of a record batch of [`schema`] (task from the partition).
pub(crate) fn from_batch(
    b: &RecordBatch,
    task: &str,
) -> std::result::Result<Vec<PathRecord>, String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .cloned()
            .ok_or_else(|| format!("no column {name:?}"))
    };
    let strs = |name: &str| -> std::result::Result<Vec<Option<String>>, String> {
        let c = col(name)?;
        let a = c
            .as_string_opt::<i32>()
            .ok_or_else(|| format!("column {name:?} is not a string column"))?;
        Ok((0..a.len())
            .map(|i| a.is_valid(i).then(|| a.value(i).to_string()))
            .collect())
    };
    let bools = |name: &str| -> std::result::Result<Vec<bool>, String> {
        let c = col(name)?;
        let a = c
            .as_boolean_opt()
            .ok_or_else(|| format!("column {name:?} is not boolean"))?;
        Ok((0..a.len()).map(|i| a.value(i)).collect())
    };
    macro_rules! prim {
        ($name:expr, $t:ty) => {{
            let c = col($name)?;
            let a = c
                .as_primitive_opt::<$t>()
                .ok_or_else(|| format!("column {:?} has the wrong type", $name))?;
            (0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i)))
                .collect::<Vec<_>>()
        }};
    }
    macro_rules! list {
        ($c:expr, $t:ty, $name:expr) => {{
            let l = $c
                .as_list_opt::<i32>()
                .ok_or_else(|| format!("column {:?} is not a list", $name))?;
            (0..l.len())
                .map(|i| {
                    if !l.is_valid(i) {
                        return Ok(None);
                    }
                    let v = l.value(i);
                    let p = v
                        .as_primitive_opt::<$t>()
                        .ok_or_else(|| format!("column {:?} has the wrong item type", $name))?;
                    Ok(Some(p.values().to_vec()))
                })
                .collect::<std::result::Result<Vec<_>, String>>()?
        }};
    }
    let n = b.num_rows();
    let (ids, splits, qs, answers, prompts, models, workers, responses) = (
        strs("sample_id")?,
        strs("split")?,
        strs("question")?,
        strs("answer")?,
        strs("prompt")?,
        strs("model")?,
        strs("worker")?,
        strs("best_response")?,
    );
    let (dc, found, improved) = (
        bools("default_correct")?,
        bools("found")?,
        bools("improved")?,
    );
    let layers_n = prim!("num_layers", UInt16Type);
    let cost = prim!("best_cost", UInt32Type);
    let (sims, evals) = (
        prim!("simulations", UInt32Type),
        prim!("evaluations", UInt32Type),
    );
    let (ms, seeds) = (prim!("search_ms", UInt64Type), prim!("seed", UInt64Type));
    let (best_col, layers_col) = (col("best_path")?, col("best_layers")?);
    let best = list!(best_col, UInt8Type, "best_path");
    let best_layers = list!(layers_col, UInt16Type, "best_layers");
    let good_col = col("good_paths")?;
    let good_outer = good_col
        .as_list_opt::<i32>()
        .ok_or("column \"good_paths\" is not a list")?;
    let mut good = Vec::with_capacity(n);
    for i in 0..n {
        let inner = good_outer.value(i);
        let paths = list!(inner, UInt8Type, "good_paths");
        good.push(paths.into_iter().flatten().collect::<Vec<_>>());
    }
    let req = |v: Option<String>, name: &str| v.ok_or_else(|| format!("null in column {name:?}"));
    let path = |counts: Vec<u8>, what: &str, i: usize| {
        LayerPath::from_counts(counts).map_err(|e| format!("row {i}: {what}: {e}"))
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let best_path = best[i]
            .clone()
            .map(|c| path(c, "best_path", i))
            .transpose()?;
        let good_paths = good[i]
            .iter()
            .map(|c| path(c.clone(), "a good path", i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let row = PathRecord {
            sample_id: req(ids[i].clone(), "sample_id")?,
            task: task.to_string(),
            split: req(splits[i].clone(), "split")?,
            question: req(qs[i].clone(), "question")?,
            answer: req(answers[i].clone(), "answer")?,
            prompt: req(prompts[i].clone(), "prompt")?,
            model: req(models[i].clone(), "model")?,
            num_layers: layers_n[i].ok_or("null num_layers")?,
            default_correct: dc[i],
            found: found[i],
            improved: improved[i],
            best_path,
            good_paths,
            simulations: sims[i].ok_or("null simulations")?,
            evaluations: evals[i].ok_or("null evaluations")?,
            search_ms: ms[i].ok_or("null search_ms")?,
            worker: req(workers[i].clone(), "worker")?,
            seed: seeds[i].ok_or("null seed")?,
            best_response: responses[i].clone(),
        };
        // The derived columns must agree with the stored path (a file edited or written by
        // another tool may not).
        if cost[i] != row.best_cost() || best_layers[i] != row.best_layers() {
            return Err(format!(
                "row {i} ({}): best_cost {:?} / best_layers do not match best_path (cost {:?})",
                row.sample_id,
                cost[i],
                row.best_cost()
            ));
        }
        row.validate(row.num_layers as usize)
            .map_err(|e| format!("row {i} ({}): {e}", row.sample_id))?;
        out.push(row);
    }
    Ok(out)
}
