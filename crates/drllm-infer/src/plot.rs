//! `drllm-infer eval --plot FILE.png|svg`: the routing pattern (per block, how often prompts of
//! each task skip, execute or repeat it), the histogram of chosen path costs, and accuracy
//! against average cost for the baseline and every budget evaluated.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// What the plot shows of one task.
pub struct TaskPlot {
    pub name: String,
    /// Per block: fraction of prompts that skip, execute, repeat it (at `budget`).
    pub freq: Vec<[f64; 3]>,
    /// Cost of every prompt's routed path (at `budget`).
    pub costs: Vec<usize>,
    /// Baseline accuracy (all blocks once).
    pub baseline_accuracy: f64,
    /// (budget, average cost, accuracy) of every routed run.
    pub sweep: Vec<(f64, f64, f64)>,
    /// (cost, accuracy) of every static path evaluated (`--path`).
    pub statics: Vec<(f64, f64)>,
}

/// Everything drawn.
pub struct PlotData {
    pub title: String,
    pub num_layers: usize,
    /// The budget whose routing pattern and costs are drawn.
    pub budget: f64,
    pub tasks: Vec<TaskPlot>,
}

const SKIP: RGBColor = RGBColor(214, 39, 40);
const EXEC: RGBColor = RGBColor(170, 170, 170);
const REPEAT: RGBColor = RGBColor(31, 119, 180);

fn task_color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
    ];
    C[i % C.len()]
}

/// Makes the bundled DejaVu Sans the "sans-serif" family, once per process: plots then render
/// the same on machines without fonts or fontconfig.
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    if !ok {
        bail!("the bundled DejaVu Sans font could not be loaded");
    }
    Ok(())
}

/// The image format a plot path asks for, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    /// The format of `path`, or an error naming it (checked before any model work).
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => bail!(
                "--plot {}: expected a file name ending in .png or .svg",
                path.display()
            ),
        }
    }
}

/// Draws `data` to `path`; the extension (.png or .svg) picks the format.
pub fn draw(path: &Path, data: &PlotData) -> Result<()> {
    let format = Format::of(path)?;
    register_font()?;
    let rows = data.tasks.len().max(1) as u32;
    let size = (1200u32, 300 * rows + 420);
    let written = match format {
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_on(&root, data)?;
            root.present().map_err(|e| anyhow!("{e}"))
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_on(&root, data)?;
            root.present().map_err(|e| anyhow!("{e}"))
        }
    };
    written.with_context(|| format!("writing {}", path.display()))
}

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, data: &PlotData) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(&data.title, ("sans-serif", 22)).map_err(e)?;
    let (_, h) = root.dim_in_pixel();
    let (top, bottom) = root.split_vertically(h.saturating_sub(400));
    let n_layers = data.num_layers;
    for (i, (t, area)) in data
        .tasks
        .iter()
        .zip(top.split_evenly((data.tasks.len().max(1), 1)))
        .enumerate()
    {
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "routing pattern: {} ({} prompts, budget {})",
                    t.name,
                    t.costs.len(),
                    data.budget
                ),
                ("sans-serif", 17),
            )
            .margin(8)
            .margin_right(110)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..n_layers as f64 - 0.5, 0f64..1f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n_layers.min(30))
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .x_desc(if i + 1 == data.tasks.len() {
                "block"
            } else {
                ""
            })
            .y_desc("fraction")
            .draw()
            .map_err(e)?;
        // Stacked bars: skip at the bottom, then execute, then repeat.
        let classes = [(SKIP, "skip"), (EXEC, "execute"), (REPEAT, "repeat")];
        for (class, (color, _)) in classes.into_iter().enumerate() {
            let bars = t.freq.iter().enumerate().map(|(l, f)| {
                let lo: f64 = f[..class].iter().sum();
                let x = l as f64;
                Rectangle::new([(x - 0.4, lo), (x + 0.4, lo + f[class])], color.filled())
            });
            chart.draw_series(bars).map_err(e)?;
        }
        // The key sits right of the bars (every bar reaches 1, so inside it would hide some).
        let (w, _) = area.dim_in_pixel();
        let x0 = w as i32 - 95;
        for (k, (color, label)) in classes.into_iter().enumerate() {
            let y0 = 45 + 24 * k as i32;
            area.draw(&Rectangle::new(
                [(x0, y0), (x0 + 14, y0 + 14)],
                color.filled(),
            ))
            .map_err(e)?;
            area.draw(&Text::new(label, (x0 + 20, y0), ("sans-serif", 14)))
                .map_err(e)?;
        }
    }

    let (left, right) = bottom.split_horizontally(600);
    // Cost histogram: one bar group per cost, one bar per task.
    let max_cost = 2 * n_layers;
    let (lo, hi) = data
        .tasks
        .iter()
        .flat_map(|t| t.costs.iter().copied())
        .fold((n_layers, n_layers), |(a, b), c| (a.min(c), b.max(c)));
    let (lo, hi) = (lo.saturating_sub(1), (hi + 1).min(max_cost));
    let mut counts = vec![vec![0usize; max_cost + 1]; data.tasks.len()];
    for (t, c) in data.tasks.iter().zip(counts.iter_mut()) {
        for &x in &t.costs {
            c[x.min(max_cost)] += 1;
        }
    }
    let top_count = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("cost of the routed paths (baseline {n_layers})"),
            ("sans-serif", 17),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(
            lo as f64 - 0.5..hi as f64 + 0.5,
            // Headroom above the tallest bar for the key (one line per task).
            0f64..top_count as f64 * (1.2 + 0.08 * data.tasks.len() as f64),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("block applications per token")
        .y_desc("prompts")
        .light_line_style(WHITE)
        .y_labels((top_count + 1).min(11))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_label_formatter(&|y| format!("{}", y.round() as i64))
        .draw()
        .map_err(e)?;
    let k = data.tasks.len().max(1) as f64;
    for (i, (t, c)) in data.tasks.iter().zip(&counts).enumerate() {
        let color = task_color(i);
        let w = 0.8 / k;
        let bars = c.iter().enumerate().filter(|(_, &n)| n > 0).map(|(x, &n)| {
            let x0 = x as f64 - 0.4 + i as f64 * w;
            Rectangle::new([(x0, 0.0), (x0 + w, n as f64)], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(e)?
            .label(t.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;

    // Accuracy against average cost: the baseline and each budget, per task.
    let (xmin, xmax) = data
        .tasks
        .iter()
        .flat_map(|t| {
            t.sweep
                .iter()
                .map(|s| s.1)
                .chain(t.statics.iter().map(|s| s.0))
        })
        .fold((n_layers as f64, n_layers as f64), |(lo, hi), c| {
            (lo.min(c), hi.max(c))
        });
    let mut chart = ChartBuilder::on(&right)
        .caption("accuracy vs average cost", ("sans-serif", 17))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d((xmin - 1.0).max(0.0)..xmax + 1.0, 0f64..1.05f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("average block applications per token")
        .y_desc("accuracy")
        .draw()
        .map_err(e)?;
    for (i, t) in data.tasks.iter().enumerate() {
        let color = task_color(i);
        let mut pts: Vec<(f64, f64, f64)> = t.sweep.clone();
        pts.sort_by(|a, b| a.1.total_cmp(&b.1));
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|&(_, c, a)| (c, a)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(format!("{} routed", t.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&(b, c, a)| {
                EmptyElement::at((c, a))
                    + Circle::new((0, 0), 4, color.filled())
                    + Text::new(format!("{b:+.2}"), (6, -14), ("sans-serif", 12))
            }))
            .map_err(e)?;
        chart
            .draw_series(t.statics.iter().map(|&(c, a)| {
                EmptyElement::at((c, a))
                    + TriangleMarker::new((0, 0), 6, color.stroke_width(2))
                    + Text::new("static", (6, 4), ("sans-serif", 11))
            }))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((n_layers as f64, t.baseline_accuracy))
                    + Cross::new((0, 0), 7, color.stroke_width(2))
                    // Left of the mark: the baseline sits at the right edge of the axis.
                    + Text::new("baseline", (-58, 6), ("sans-serif", 12)),
            ))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> PlotData {
        let freq = (0..30)
            .map(|l| {
                let s = if l > 24 { 0.3 } else { 0.0 };
                let r = if l == 3 { 0.2 } else { 0.0 };
                [s, 1.0 - s - r, r]
            })
            .collect();
        PlotData {
            title: "test".into(),
            num_layers: 30,
            budget: 0.0,
            tasks: vec![TaskPlot {
                name: "arc_easy".into(),
                freq,
                costs: vec![28, 29, 29, 30, 31],
                baseline_accuracy: 0.4,
                sweep: vec![(-0.5, 25.0, 0.3), (0.0, 29.4, 0.4)],
                statics: vec![(27.0, 0.38)],
            }],
        }
    }

    #[test]
    fn writes_png_and_svg_and_refuses_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("r.png");
        draw(&png, &data()).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let svg = dir.path().join("r.svg");
        draw(&svg, &data()).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("routing pattern: arc_easy"));
        let err = draw(&dir.path().join("r.pdf"), &data()).unwrap_err();
        assert!(err
            .to_string()
            .contains("expected a file name ending in .png or .svg"));
    }
}
