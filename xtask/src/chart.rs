//! A grouped bar chart as SVG, written by hand: a dozen bars do not justify a plotting library
//! in the build. Log-scale value axis, because herald and the naive pattern differ by three
//! orders of magnitude.

/// One group of bars (one broker and message size), one bar per series.
pub(crate) struct Group {
    pub(crate) label: String,
    pub(crate) values: Vec<f64>,
}

const COLOURS: &[&str] = &["#4c72b0", "#dd8452", "#55a868", "#c44e52"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders `groups` (each with one value per name in `series`) as an SVG document.
pub(crate) fn bars(title: &str, unit: &str, series: &[&str], groups: &[Group]) -> String {
    let (left, right, top, bottom) = (80.0, 20.0, 50.0, 84.0);
    let bar_w = 26.0;
    let gap = 30.0;
    let group_w = bar_w * series.len() as f64 + gap;
    let plot_w = group_w * groups.len().max(1) as f64;
    let plot_h = 300.0;
    let (width, height) = (left + plot_w + right, top + plot_h + bottom);

    let positive = groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .filter(|v| *v > 0.0);
    let max = positive.clone().fold(1.0f64, f64::max);
    let min = positive.fold(max, f64::min);
    // One decade below the smallest value, so that the smallest bar still shows.
    let lo = min.log10().floor() - 1.0;
    let hi = max.log10().ceil().max(lo + 1.0);
    let y = |v: f64| top + plot_h - (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * plot_h;

    let mut s = String::new();
    s.push_str(&format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    ));
    s.push_str(&format!(
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        width / 2.0,
        escape(title)
    ));
    // Axis: a line per power of ten.
    let mut p = lo as i32;
    while f64::from(p) <= hi {
        let v = 10f64.powi(p);
        let yy = y(v);
        let label = match p {
            p if p >= 6 => format!("{}M", 10u64.pow((p - 6) as u32)),
            p if p >= 3 => format!("{}k", 10u64.pow((p - 3) as u32)),
            p => format!("{}", 10f64.powi(p)),
        };
        s.push_str(&format!(
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            left + plot_w,
            left - 6.0,
            yy + 4.0
        ));
        p += 1;
    }
    s.push_str(&format!(
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        escape(unit)
    ));
    for (gi, g) in groups.iter().enumerate() {
        let x0 = left + gap / 2.0 + gi as f64 * group_w;
        for (si, v) in g.values.iter().enumerate() {
            let x = x0 + si as f64 * bar_w;
            let yy = y(*v);
            let colour = COLOURS[si % COLOURS.len()];
            s.push_str(&format!(
                r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {v:.0}</title></rect>"#,
                bar_w - 2.0,
                top + plot_h - yy,
                escape(series.get(si).copied().unwrap_or("?"))
            ));
        }
        // A label's lines (split at '\n') stacked under the group.
        let cx = x0 + bar_w * series.len() as f64 / 2.0;
        s.push_str(&format!(
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">"#,
            top + plot_h + 18.0,
        ));
        for (li, line) in g.label.split('\n').enumerate() {
            let dy = if li == 0 { 0.0 } else { 14.0 };
            s.push_str(&format!(
                r#"<tspan x="{cx:.1}" dy="{dy:.1}">{}</tspan>"#,
                escape(line)
            ));
        }
        s.push_str("</text>");
    }
    // Legend.
    let mut lx = left;
    for (si, name) in series.iter().enumerate() {
        let ly = height - 22.0;
        s.push_str(&format!(
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{ly}">{}</text>"#,
            ly - 10.0,
            COLOURS[si % COLOURS.len()],
            lx + 16.0,
            escape(name)
        ));
        lx += 24.0 + 7.0 * name.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_as_tall_as_their_values_on_a_log_scale() {
        let svg = bars(
            "t",
            "msgs/s",
            &["herald", "raw", "naive"],
            &[Group {
                label: "Kafka 100 B".into(),
                values: vec![100_000.0, 1_000_000.0, 100.0],
            }],
        );
        let heights: Vec<f64> = svg
            .split("<rect x=")
            .skip(1)
            .filter_map(|r| {
                let h = r.split("height=\"").nth(1)?;
                h.split('"').next()?.parse().ok()
            })
            .filter(|h: &f64| *h != 12.0)
            .collect();
        assert_eq!(heights.len(), 3, "{svg}");
        // The scale runs from 10^1 (a decade below the smallest) to 10^6: 60 px per decade.
        let per_decade = 300.0 / 5.0;
        assert!((heights[0] - 4.0 * per_decade).abs() < 0.2, "{heights:?}");
        assert!((heights[1] - 5.0 * per_decade).abs() < 0.2, "{heights:?}");
        assert!((heights[2] - 1.0 * per_decade).abs() < 0.2, "{heights:?}");
        assert!(svg.contains("Kafka 100 B") && svg.ends_with("</svg>\n"));
    }
}
