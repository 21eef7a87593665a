//! A small dependency-free SVG chart writer for devnet reports.

use std::fmt::Write;

/// One line series.
#[derive(Debug)]
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Colour (CSS).
    pub color: &'a str,
    /// Points `(x, y)`.
    pub points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart of `series` plus a bar chart of `bars` (label, value in [0, 1]) side by side.
pub fn chart(title_left: &str, x_label: &str, series: &[Series], title_right: &str, bars: &[(String, f64)]) -> String {
    let (w, h) = (1000.0, 420.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    // Left panel: lines.
    let (x0, y0, pw, ph) = (60.0, 40.0, 420.0, 320.0);
    let pts: Vec<(f64, f64)> =
        series.iter().flat_map(|se| se.points.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let (xmin, xmax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin { (xmin, xmax) } else { (0.0, 1.0) };
    let (ymin, ymax) =
        if ymin.is_finite() && ymax > ymin { (ymin, ymax) } else { (ymin.min(0.0), ymin.max(0.0) + 1.0) };
    let sx = |x: f64| x0 + (x - xmin) / (xmax - xmin) * pw;
    let sy = |y: f64| y0 + ph - (y - ymin) / (ymax - ymin) * ph;
    let _ = write!(s, r#"<text x="{}" y="24" font-size="15">{}</text>"#, x0, esc(title_left));
    let _ = write!(s, r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##);
    for k in 0..=4 {
        let y = ymin + (ymax - ymin) * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{:.3}</text><line x1="{x0}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##,
            x0 - 4.0,
            sy(y) + 4.0,
            y,
            x0 + pw,
            sy(y),
            sy(y)
        );
        let x = xmin + (xmax - xmin) * k as f64 / 4.0;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text>"#, sx(x), y0 + ph + 16.0, x);
    }
    let _ =
        write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + pw / 2.0, y0 + ph + 34.0, esc(x_label));
    for (i, se) in series.iter().enumerate() {
        let path: Vec<String> =
            se.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        // Later series are dashed so that identical curves stay visible.
        let dash = if i > 0 { r#" stroke-dasharray="6 4""# } else { "" };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
            se.color,
            path.join(" ")
        );
        let ly = y0 + 14.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            x0 + pw - 150.0,
            x0 + pw - 130.0,
            se.color,
            x0 + pw - 125.0,
            ly + 4.0,
            esc(se.label)
        );
    }
    // Right panel: bars.
    let (bx0, by0, bw, bh) = (560.0, 40.0, 400.0, 320.0);
    let _ = write!(s, r#"<text x="{bx0}" y="24" font-size="15">{}</text>"#, esc(title_right));
    let n = bars.len().max(1) as f64;
    let slot = bh / n;
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = by0 + slot * i as f64;
        let len = (v.clamp(0.0, 1.0)) * (bw - 150.0);
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{}" y="{}" width="{len:.1}" height="{:.1}" fill="#4a7ebb"/><text x="{}" y="{}">{:.4}</text>"##,
            bx0 + 140.0,
            y + slot * 0.6,
            esc(label),
            bx0 + 145.0,
            y + slot * 0.15,
            slot * 0.7,
            bx0 + 150.0 + len,
            y + slot * 0.6,
            v
        );
    }
    s.push_str("</svg>\n");
    s
}
