//! Draws the JSON of `--json FILE` as one SVG bar chart: deliveries per second of each
//! contender, grouped by backend.
//!
//! ```text
//! cd benches/compare && cargo run --release --bin chart -- results.json out.svg
//! ```
//!
//! Text is laid out by plotters' built-in metrics (no `ttf` feature), so no font files are read;
//! the viewer renders the SVG's `<text>` with its own fonts.

use plotters::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Results {
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    contender: String,
    backend: String,
    per_sec: f64,
}

/// Contenders in the order their bars stand in a group, each with its colour.
const CONTENDERS: [(&str, RGBColor); 7] = [
    ("raw", RGBColor(120, 120, 120)),
    ("bare", RGBColor(31, 119, 180)),
    ("hand-rolled", RGBColor(255, 127, 14)),
    ("apalis-webhooks", RGBColor(44, 160, 44)),
    ("apalis-webhooks-batched", RGBColor(152, 223, 138)),
    ("webhook-dispatcher", RGBColor(214, 39, 40)),
    ("webhooksmith", RGBColor(148, 103, 189)),
];
/// Backends in the order of their groups.
const BACKENDS: [&str; 5] = ["none", "memory", "sqlite", "postgres", "redis"];

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: chart RESULTS.json OUT.svg".into());
    };
    let results: Results = serde_json::from_str(&std::fs::read_to_string(&input)?)?;

    // The groups that have rows, and in each the contenders that have one, in the fixed orders
    // (unknown names go last, so a new contender still shows).
    let mut backends: Vec<&str> = BACKENDS
        .iter()
        .copied()
        .filter(|b| results.rows.iter().any(|r| r.backend == *b))
        .collect();
    for row in &results.rows {
        if !backends.contains(&row.backend.as_str()) {
            backends.push(&row.backend);
        }
    }
    let rank = |name: &str| {
        CONTENDERS
            .iter()
            .position(|(c, _)| *c == name)
            .unwrap_or(CONTENDERS.len())
    };
    let colour = |name: &str| {
        CONTENDERS
            .iter()
            .find(|(c, _)| *c == name)
            .map_or(RGBColor(60, 60, 60), |(_, colour)| *colour)
    };

    // x: one unit per bar, a gap of one unit between groups.
    let mut bars: Vec<(f64, &Row)> = Vec::new();
    let mut centres: Vec<(f64, &str)> = Vec::new();
    let mut x = 0.5;
    for backend in &backends {
        let mut group: Vec<&Row> = results.rows.iter().filter(|r| r.backend == *backend).collect();
        group.sort_by_key(|r| rank(&r.contender));
        let start = x;
        for row in group {
            bars.push((x, row));
            x += 1.0;
        }
        centres.push(((start + x) / 2.0, backend));
        x += 1.0;
    }
    let width = x - 0.5;
    let top = bars.iter().map(|(_, r)| r.per_sec).fold(0.0, f64::max).max(1.0) * 1.15;

    let root = SVGBackend::new(&output, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Deliveries per second (higher is better)", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..width, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc("deliveries/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;

    let mut seen: Vec<&str> = bars.iter().map(|(_, r)| r.contender.as_str()).collect();
    seen.sort_by_key(|c| rank(c));
    seen.dedup();
    for contender in seen {
        let fill = colour(contender);
        chart
            .draw_series(
                bars.iter()
                    .filter(|(_, r)| r.contender == contender)
                    .map(|(x, r)| Rectangle::new([(*x + 0.05, 0.0), (*x + 0.95, r.per_sec)], fill.filled())),
            )?
            .label(contender)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], fill.filled()));
        chart.draw_series(bars.iter().filter(|(_, r)| r.contender == contender).map(|(x, r)| {
            Text::new(
                format!("{:.0}", r.per_sec),
                (*x + 0.1, r.per_sec + top * 0.01),
                ("sans-serif", 12).into_font().transform(FontTransform::Rotate270),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;

    // Backend names under their groups, placed in pixels below the x axis.
    for (centre, backend) in centres {
        let (px, py) = chart.backend_coord(&(centre, 0.0));
        root.draw(&Text::new(
            backend.to_owned(),
            (px - 4 * backend.len() as i32, py + 12),
            ("sans-serif", 16),
        ))?;
    }
    root.present()?;
    eprintln!("wrote {output}");
    Ok(())
}
