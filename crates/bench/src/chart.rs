//! The run's chart: reports per second over the full-speed load of scenario a, and the
//! ingress answer latency by percentile, as one SVG image beside the Markdown report (SVG
//! needs no font files to draw text, so it renders the same on any machine).

use std::path::Path;

use plotters::prelude::*;

use crate::e2e;

/// x position of a percentile: -log10(1 - p), so p50, p90, p99, p99.9 are evenly spaced.
fn tail(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).log10()
}

/// Per-second rates between consecutive samples: (second, accepted/s, applied/s).
pub fn rates(timeline: &[e2e::Sample]) -> Vec<(f64, f64, f64)> {
    timeline
        .windows(2)
        .filter_map(|pair| {
            let (a, b) = (pair[0], pair[1]);
            let dt = b.second - a.second;
            (dt > 0.0).then(|| {
                (
                    b.second,
                    (b.accepted - a.accepted) as f64 / dt,
                    (b.applied.saturating_sub(a.applied)) as f64 / dt,
                )
            })
        })
        .collect()
}

/// Draws `e2e`'s timeline and latency percentiles into `path` (SVG).
pub fn render(e2e: &e2e::Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(380);

    let rates = rates(&e2e.timeline);
    let end = rates.last().map_or(1.0, |r| r.0).max(1.0);
    let peak = rates.iter().map(|r| r.1.max(r.2)).fold(1.0_f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!(
                "scenario a: {} reports from {} devices",
                e2e.reports, e2e.devices
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..peak)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first report")
        .y_desc("reports per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(rates.iter().map(|r| (r.0, r.1)), &BLUE))?
        .label("accepted (durable, answered)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(rates.iter().map(|r| (r.0, r.2)), &RED))?
        .label("applied in PostgreSQL")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let points: Vec<(f64, f64)> = e2e
        .ingress_percentiles
        .iter()
        .map(|(p, ms)| (tail(*p), *ms))
        .collect();
    let slowest = points.iter().map(|p| p.1).fold(1.0_f64, f64::max) * 1.1;
    let widest = points.last().map_or(4.0, |p| p.0).max(1.0);
    let mut chart = ChartBuilder::on(&lower)
        .caption(
            "ingress answer latency by percentile (device request to durable reply)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..widest, 0.0..slowest)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            format!("p{p:.2}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_owned()
        })
        .x_desc("percentile")
        .y_desc("milliseconds")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
    chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_per_second_between_samples() {
        let sample = |second, accepted, applied| e2e::Sample {
            second,
            accepted,
            applied,
        };
        let rates = rates(&[
            sample(1.0, 100, 0),
            sample(2.0, 300, 150),
            sample(4.0, 700, 550),
        ]);
        assert_eq!(rates, vec![(2.0, 200.0, 150.0), (4.0, 200.0, 200.0)]);
    }

    #[test]
    fn percentiles_are_spaced_by_their_tail() {
        assert!((tail(90.0) - 1.0).abs() < 1e-9);
        assert!((tail(99.9) - 3.0).abs() < 1e-9);
    }
}
