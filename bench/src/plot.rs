//! SVG plots: latency percentile distribution, and the failover timeline.

use plotters::prelude::*;

use crate::stats::Summary;

/// Percentile distribution (x: percentile as "nines", y: latency us), one series per run.
pub fn percentiles(
    path: &str,
    title: &str,
    series: &[(String, Summary)],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = series.iter().map(|(_, s)| s.max).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..4.5f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("percentile (0=p0, 1=p90, 2=p99, 3=p99.9, 4=p99.99, 4.5=max)")
        .y_desc("latency (us)")
        .draw()?;
    for (i, (name, s)) in series.iter().enumerate() {
        let pts = vec![
            (0.3, s.p50),
            (1.0, s.p90),
            (2.0, s.p99),
            (3.0, s.p999),
            (4.0, s.p9999),
            (4.5, s.max),
        ];
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Per-record one-way latency against send time, with the fault marked.
pub fn timeline(
    path: &str,
    title: &str,
    points: &[(f64, f64)],
    fault_at_ms: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("send time (ms, virtual)")
        .y_desc("one-way latency (us)")
        .draw()?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 1, BLUE.filled())))?;
    chart.draw_series(LineSeries::new(
        vec![(fault_at_ms, 0.0), (fault_at_ms, ymax)],
        RED.stroke_width(1),
    ))?;
    root.present()?;
    Ok(())
}
