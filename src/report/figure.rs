//! The figures, drawn with plotters into a PNG and an SVG from the same code.
//!
//! Per case: the confidence curve across layers (the notebook's mean max probability over all
//! positions, the top-1 probability at the probed position, traced targets; entropy and KL to the
//! final layer on a second axis in nats) beside a table of the top tokens per layer (final layer at
//! the top, cells shaded by probability, the final layer's top-1 outlined wherever it appears).
//! Per prompt: every image's curves overlaid, with the mean over images.
//!
//! Text is drawn with DejaVu Sans, embedded in the binary (`fonts/`, Bitstream Vera licence), so
//! the PNGs need no system fonts. Characters the font lacks are written as `\u{…}` escapes;
//! spaces, newlines and tabs in tokens as `␣`, `↵` and `⇥`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::summary::{layer_points, probed_position, LayerPoint, Row};
use super::Case;
use crate::api::LensResponse;
use crate::error::{Error, Result};

static FONT_BYTES: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// The embedded font, registered with plotters once.
fn font() -> Result<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| {
        let registered =
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_BYTES).is_ok();
        FontRef::try_from_slice(FONT_BYTES)
            .ok()
            .filter(|_| registered)
    })
    .as_ref()
    .ok_or_else(|| Error::Internal("the embedded DejaVu Sans font does not load".into()))
}

/// A token as the tables show it: whitespace made visible, what the font cannot draw escaped.
pub fn display_token(s: &str) -> String {
    let Ok(font) = font() else {
        return s.escape_debug().to_string();
    };
    if s.is_empty() {
        return "∅".into();
    }
    let mut out = String::new();
    for c in s.chars() {
        match c {
            ' ' => out.push('␣'),
            '\n' => out.push('↵'),
            '\t' => out.push('⇥'),
            c if c.is_control() || font.glyph_id(c).0 == 0 => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// A top-k cell's token; an id the tokenizer has no text for (a padding row of the vocabulary)
/// as `#id`.
fn cell_text(t: &crate::api::TopToken) -> String {
    if t.token.is_empty() {
        format!("#{}", t.id)
    } else {
        display_token(&t.token)
    }
}

/// Free text (titles, prompts): control characters escaped, missing glyphs escaped.
fn display_text(s: &str) -> String {
    let Ok(font) = font() else {
        return s.escape_debug().to_string();
    };
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => " ".to_string(),
            c if c.is_control() || (c != ' ' && font.glyph_id(c).0 == 0) => {
                format!("\\u{{{:x}}}", c as u32)
            }
            c => c.to_string(),
        })
        .collect()
}

/// Width in pixels of `text` at `size` as plotters lays it out.
fn text_width(text: &str, size: f64) -> f64 {
    let Ok(font) = font() else {
        return text.chars().count() as f64 * size * 0.6;
    };
    let f = font.as_scaled(size as f32);
    text.chars()
        .map(|c| f.h_advance(f.glyph_id(c)) as f64)
        .sum()
}

/// `text` cut to `max_px` with an ellipsis.
fn fit(text: &str, size: f64, max_px: f64) -> String {
    if text_width(text, size) <= max_px {
        return text.to_string();
    }
    let mut out: String = String::new();
    for c in text.chars() {
        let mut next = out.clone();
        next.push(c);
        next.push('…');
        if text_width(&next, size) > max_px {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

fn fnv1a(s: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

fn slug(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "prompt".into()
    } else {
        out
    }
}

/// The file name (no extension) of a case's figures: the image's name, the prompt's first words
/// and a hash of both, so that every case has its own file and names stay readable.
pub fn case_stem(image: &str, prompt: &str) -> String {
    let img: String = image
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    format!(
        "{img}__{}-{:08x}",
        slug(prompt, 40),
        fnv1a(&format!("{image}\0{prompt}"))
    )
}

/// The file name (no extension) of a prompt's figures.
pub fn prompt_stem(prompt: &str) -> String {
    format!("{}-{:08x}", slug(prompt, 40), fnv1a(prompt))
}

/// `stem` + `.ext` (`Path::with_extension` would cut a stem at its own dots).
pub fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

type Drawn<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Draws with `draw` into a PNG at `png` and an SVG at `svg`.
fn render(
    size: (u32, u32),
    png: &Path,
    svg: &Path,
    draw_png: impl Fn(&DrawingArea<BitMapBackend<'_>, Shift>) -> std::result::Result<(), String>,
    draw_svg: impl Fn(&DrawingArea<SVGBackend<'_>, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    font()?;
    let failed = |p: &Path, e: String| Error::Internal(format!("cannot draw {}: {e}", p.display()));
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        draw_png(&root).map_err(|e| failed(png, e))?;
        root.present().map_err(|e| failed(png, e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, pixels)
        .ok_or_else(|| failed(png, "pixel buffer of the wrong size".into()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| failed(png, e.to_string()))?;
    super::write_atomically(png, bytes.get_ref())?;

    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
        draw_svg(&root).map_err(|e| failed(svg, e))?;
        root.present().map_err(|e| failed(svg, e.to_string()))?;
    }
    super::write_atomically(svg, text.as_bytes())
}

// Layout of the case figure, in pixels.
const HEADER_H: u32 = 64;
const CHART_W: u32 = 620;
const LABEL_W: u32 = 56;
const COL_W: u32 = 118;
const ROW_H: u32 = 22;
const TABLE_TOP: u32 = 52;
/// The table shows at most this many ranks (results.jsonl has them all).
pub const MAX_TABLE_RANKS: usize = 10;

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREY: RGBColor = RGBColor(110, 110, 110);
const DARK_RED: RGBColor = RGBColor(200, 30, 30);
const TEXT_GREY: RGBColor = RGBColor(80, 80, 80);

/// A probability as a cell colour: white to dark blue.
fn shade(p: f32) -> RGBColor {
    let t = f64::from(p.clamp(0.0, 1.0));
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
    RGBColor(mix(247, 8), mix(251, 48), mix(255, 107))
}

fn ranks(r: &LensResponse) -> usize {
    r.layers
        .iter()
        .flat_map(|l| l.positions.iter().map(|p| p.top.len()))
        .max()
        .unwrap_or(0)
        .min(MAX_TABLE_RANKS)
}

fn case_size(r: &LensResponse, points: usize) -> (u32, u32) {
    let w = CHART_W + 20 + LABEL_W + ranks(r).max(1) as u32 * COL_W + 20;
    let table_h = TABLE_TOP + points as u32 * ROW_H + 30;
    (w, HEADER_H + table_h.max(480))
}

/// A case's figure, as a PNG and an SVG.
pub fn case_figure(case: &Case, png: &Path, svg: &Path) -> Result<()> {
    let points = layer_points(&case.response);
    let size = case_size(&case.response, points.len());
    render(
        size,
        png,
        svg,
        |root| draw_case(root, case, &points).map_err(|e| e.to_string()),
        |root| draw_case(root, case, &points).map_err(|e| e.to_string()),
    )
}

fn font_style(size: f64) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
}

/// The x range of a chart over these layers (integers, so ticks fall on layers).
fn layer_range(layers: impl Iterator<Item = usize>) -> std::ops::Range<i32> {
    let (mut lo, mut hi) = (i32::MAX, i32::MIN);
    for l in layers {
        lo = lo.min(l as i32);
        hi = hi.max(l as i32);
    }
    if lo > hi {
        0..1
    } else if hi > lo {
        lo..hi
    } else {
        lo - 1..hi + 1
    }
}

/// A legend entry: the line's style, whether it is dashed, its label.
type LegendItem = (ShapeStyle, bool, String);

const LEGEND_ROW: u32 = 18;

fn legend_height(items: usize, columns: usize) -> u32 {
    items.div_ceil(columns) as u32 * LEGEND_ROW + 12
}

/// A legend under a chart, in `columns` columns, so that it never hides a curve.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    items: &[LegendItem],
    columns: usize,
) -> Drawn<DB> {
    let (w, _) = area.dim_in_pixel();
    let col_w = (w as i32 - 70) / columns as i32;
    for (i, (style, dashed, label)) in items.iter().enumerate() {
        let x = 62 + (i % columns) as i32 * col_w;
        let y = 6 + (i / columns) as i32 * LEGEND_ROW as i32 + LEGEND_ROW as i32 / 2;
        if *dashed {
            area.draw(&PathElement::new(vec![(x, y), (x + 9, y)], *style))?;
            area.draw(&PathElement::new(vec![(x + 15, y), (x + 24, y)], *style))?;
        } else {
            area.draw(&PathElement::new(vec![(x, y), (x + 24, y)], *style))?;
        }
        area.draw_text(
            &fit(label, 12.0, f64::from(col_w as u32) - 36.0),
            &font_style(12.0).pos(Pos::new(HPos::Left, VPos::Center)),
            (x + 30, y),
        )?;
    }
    Ok(())
}

/// Colours for traced targets, apart from the chart's blue and orange.
const TARGET_COLOURS: [RGBColor; 6] = [
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn draw_case<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    case: &Case,
    points: &[LayerPoint],
) -> Drawn<DB> {
    let r = &case.response;
    let (w, _) = root.dim_in_pixel();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER_H);
    let title = format!(
        "{}  ·  “{}”",
        display_text(&case.image),
        display_text(&case.prompt)
    );
    header.draw_text(
        &fit(&title, 18.0, f64::from(w) - 24.0),
        &font_style(18.0),
        (12, 10),
    )?;
    let position = probed_position(r);
    let token = position
        .and_then(|p| r.input.tokens.get(p))
        .map(|t| display_token(&t.text))
        .unwrap_or_default();
    let sub = format!(
        "{} ({}, {} layers)  ·  position {} of {} (input token “{}”)  ·  table: top-{} per layer, outlined: the final layer's top-1",
        display_text(&r.model),
        r.family,
        r.num_layers,
        position.map(|p| p.to_string()).unwrap_or_else(|| "–".into()),
        r.input.num_tokens,
        token,
        ranks(r),
    );
    header.draw_text(
        &fit(&sub, 13.0, f64::from(w) - 24.0),
        &font_style(13.0).color(&TEXT_GREY),
        (12, 38),
    )?;
    if points.is_empty() {
        body.draw_text(
            "the response reports no position: nothing to draw",
            &font_style(15.0),
            (12, 20),
        )?;
        return Ok(());
    }
    let (left, right) = body.split_horizontally(CHART_W);
    draw_case_chart(&left, points)?;
    draw_table(&right, r, points)
}

/// Reads entropy or KL off a layer.
type NatsOf = fn(&LayerPoint) -> f32;

/// A thick line over images: colour, label, points.
type MeanLine<'a> = (RGBColor, &'a str, Vec<(i32, f64)>);

fn draw_case_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    points: &[LayerPoint],
) -> Drawn<DB> {
    let mut series: Vec<(LegendItem, Vec<(i32, f64)>)> = Vec::new();
    let solid = |color: RGBColor, label: String| (color.stroke_width(2), false, label);
    if points.iter().any(|p| p.mean_max_prob.is_some()) {
        series.push((
            solid(BLUE, "confidence: mean max prob, all positions".into()),
            points
                .iter()
                .filter_map(|p| p.mean_max_prob.map(|m| (p.layer as i32, f64::from(m))))
                .collect(),
        ));
    }
    series.push((
        solid(ORANGE, "top-1 prob at the position".into()),
        points
            .iter()
            .filter_map(|p| {
                p.at.top
                    .first()
                    .map(|t| (p.layer as i32, f64::from(t.prob)))
            })
            .collect(),
    ));
    let targets: Vec<(String, String)> = points
        .first()
        .map(|p| {
            p.at.targets
                .iter()
                .map(|t| (t.target.clone(), t.token.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (i, (name, token)) in targets.iter().enumerate() {
        // The token traced, where it is not the string sent (" Red" → " " when the tokenizer
        // splits the space off).
        let traced = match token.is_empty() || token == name {
            true => String::new(),
            false => format!(" → “{}”", display_token(token)),
        };
        series.push((
            solid(
                TARGET_COLOURS[i % TARGET_COLOURS.len()],
                format!("p(“{}”{traced})", display_token(name)),
            ),
            points
                .iter()
                .filter_map(|p| {
                    p.at.targets
                        .iter()
                        .find(|t| &t.target == name)
                        .map(|t| (p.layer as i32, f64::from(t.prob)))
                })
                .collect(),
        ));
    }
    let nats: [(RGBColor, &str, NatsOf); 2] = [
        (GREY, "entropy (nats, right axis)", |p| p.at.entropy),
        (DARK_RED, "KL to the final layer (nats, right axis)", |p| {
            p.at.kl_to_final
        }),
    ];
    let mut legend: Vec<LegendItem> = series.iter().map(|(item, _)| item.clone()).collect();
    legend.extend(
        nats.iter()
            .map(|(c, label, _)| (c.stroke_width(2), true, label.to_string())),
    );

    let (_, h) = area.dim_in_pixel();
    let (plot, below) = area.split_vertically(h - legend_height(legend.len(), 2).min(h / 2));
    let xs = layer_range(points.iter().map(|p| p.layer));
    let nats_max = points
        .iter()
        .flat_map(|p| [p.at.entropy, p.at.kl_to_final])
        .fold(0f32, f32::max)
        .max(1e-3) as f64
        * 1.08;
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .caption("Confidence across layers", font_style(15.0))
        .x_label_area_size(40)
        .y_label_area_size(52)
        .right_y_label_area_size(52)
        .build_cartesian_2d(xs.clone(), 0f64..1.0f64)?
        .set_secondary_coord(xs.clone(), 0f64..nats_max);
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("probability")
        .x_labels(((xs.end - xs.start) as usize + 1).min(16))
        .label_style(font_style(12.0))
        .axis_desc_style(font_style(13.0))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("nats (dashed)")
        .label_style(font_style(12.0))
        .axis_desc_style(font_style(13.0))
        .draw()?;
    for ((style, _, _), data) in series {
        chart.draw_series(LineSeries::new(data, style).point_size(3))?;
    }
    for (color, _, f) in nats {
        let data: Vec<(i32, f64)> = points
            .iter()
            .map(|p| (p.layer as i32, f64::from(f(p))))
            .collect();
        chart.draw_secondary_series(DashedLineSeries::new(data, 6, 4, color.stroke_width(2)))?;
    }
    draw_legend(&below, &legend, 2)
}

fn draw_table<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &LensResponse,
    points: &[LayerPoint],
) -> Drawn<DB> {
    let k = ranks(r);
    let x0 = 20i32;
    let centre = |x: i32, y: i32| (x, y);
    let final_top = points
        .iter()
        .find(|p| p.layer == r.num_layers)
        .and_then(|p| p.at.top.first())
        .map(|t| t.id);
    area.draw_text(
        &format!("Top-{k} tokens per layer (probability)"),
        &font_style(15.0),
        (x0, 14),
    )?;
    let head_y = TABLE_TOP as i32 - ROW_H as i32 / 2 - 2;
    let mid = font_style(12.0).pos(Pos::new(HPos::Center, VPos::Center));
    area.draw_text("layer", &mid, centre(x0 + LABEL_W as i32 / 2, head_y))?;
    for rank in 0..k {
        let x = x0 + LABEL_W as i32 + (rank as u32 * COL_W) as i32 + COL_W as i32 / 2;
        area.draw_text(&format!("#{}", rank + 1), &mid, (x, head_y))?;
    }
    for (row, p) in points.iter().rev().enumerate() {
        let y = TABLE_TOP as i32 + (row as u32 * ROW_H) as i32;
        let cy = y + ROW_H as i32 / 2;
        area.draw_text(
            &p.layer.to_string(),
            &font_style(12.0).pos(Pos::new(HPos::Right, VPos::Center)),
            (x0 + LABEL_W as i32 - 10, cy),
        )?;
        for (rank, t) in p.at.top.iter().take(k).enumerate() {
            let x = x0 + LABEL_W as i32 + (rank as u32 * COL_W) as i32;
            let (x1, y1) = (x + COL_W as i32 - 2, y + ROW_H as i32 - 2);
            area.draw(&Rectangle::new([(x, y), (x1, y1)], shade(t.prob).filled()))?;
            if Some(t.id) == final_top {
                area.draw(&Rectangle::new(
                    [(x, y), (x1, y1)],
                    DARK_RED.stroke_width(2),
                ))?;
            }
            let ink = if t.prob > 0.55 { WHITE } else { BLACK };
            let prob = format!("{:.2}", t.prob);
            let prob_w = text_width(&prob, 11.0);
            area.draw_text(
                &fit(&cell_text(t), 12.0, f64::from(COL_W) - 14.0 - prob_w),
                &font_style(12.0)
                    .color(&ink)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
                (x + 4, cy - 1),
            )?;
            area.draw_text(
                &prob,
                &font_style(11.0)
                    .color(&ink.mix(0.8))
                    .pos(Pos::new(HPos::Right, VPos::Center)),
                (x1 - 4, cy - 1),
            )?;
        }
    }
    Ok(())
}

/// A prompt's figure: every image's curves and the mean over images (the summary's rows).
pub fn prompt_figure(
    prompt: &str,
    cases: &[&Case],
    rows: &[&Row],
    png: &Path,
    svg: &Path,
) -> Result<()> {
    let views: Vec<(&Case, Vec<LayerPoint>)> = cases
        .iter()
        .map(|c| (*c, layer_points(&c.response)))
        .collect();
    let legend_rows = if cases.len() <= LEGEND_IMAGES {
        cases.len()
    } else {
        1
    } + 2;
    render(
        (1320, HEADER_H + 470 + legend_height(legend_rows, 1)),
        png,
        svg,
        |root| draw_prompt(root, prompt, &views, rows).map_err(|e| e.to_string()),
        |root| draw_prompt(root, prompt, &views, rows).map_err(|e| e.to_string()),
    )
}

/// One image's line in a prompt figure.
struct Curve {
    label: String,
    points: Vec<(i32, f64)>,
}

fn draw_prompt<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    prompt: &str,
    views: &[(&Case, Vec<LayerPoint>)],
    rows: &[&Row],
) -> Drawn<DB> {
    let (w, _) = root.dim_in_pixel();
    root.fill(&WHITE)?;
    let (header, body) = root.split_vertically(HEADER_H);
    header.draw_text(
        &fit(
            &format!("“{}”", display_text(prompt)),
            18.0,
            f64::from(w) - 24.0,
        ),
        &font_style(18.0),
        (12, 10),
    )?;
    let models: Vec<String> = {
        let mut m: Vec<String> = views
            .iter()
            .map(|(c, _)| c.response.model.clone())
            .collect();
        m.sort();
        m.dedup();
        m
    };
    header.draw_text(
        &fit(
            &format!(
                "{}  ·  {} images  ·  thin: one image each, thick: over images (the rows of summary.csv)",
                display_text(&models.join(", ")),
                views.len()
            ),
            13.0,
            f64::from(w) - 24.0,
        ),
        &font_style(13.0).color(&TEXT_GREY),
        (12, 38),
    )?;
    let (left, right) = body.split_horizontally(w / 2);
    let image_curves = |f: &dyn Fn(&LayerPoint) -> Option<f64>| -> Vec<Curve> {
        views
            .iter()
            .map(|(c, pts)| Curve {
                label: display_text(&c.image),
                points: pts
                    .iter()
                    .filter_map(|p| f(p).map(|v| (p.layer as i32, v)))
                    .collect(),
            })
            .collect()
    };
    let mean = |f: &dyn Fn(&Row) -> Option<f64>| -> Vec<(i32, f64)> {
        rows.iter()
            .filter_map(|r| f(r).map(|v| (r.layer as i32, v)))
            .collect()
    };
    panel(
        &left,
        "Confidence: mean max prob over all positions",
        &image_curves(&|p| p.mean_max_prob.map(f64::from)),
        &[(BLACK, "mean over images", mean(&|r| r.mean_max_prob))],
    )?;
    panel(
        &right,
        "At the probed position: top-1 prob, agreement with the final layer",
        &image_curves(&|p| p.at.top.first().map(|t| f64::from(t.prob))),
        &[
            (BLACK, "mean top-1 prob", mean(&|r| r.last_top1_prob)),
            (
                DARK_RED,
                "top-1 agreement with the final layer (fraction of images)",
                mean(&|r| r.top1_agreement),
            ),
        ],
    )
}

/// Images named one by one in a prompt figure's legend; more are summed up in one entry.
const LEGEND_IMAGES: usize = 8;

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    curves: &[Curve],
    means: &[MeanLine],
) -> Drawn<DB> {
    let style_of = |i: usize| Palette99::pick(i).mix(0.75).stroke_width(1);
    let mut legend: Vec<LegendItem> = Vec::new();
    if curves.len() <= LEGEND_IMAGES {
        legend.extend(
            curves
                .iter()
                .enumerate()
                .map(|(i, c)| (style_of(i), false, c.label.clone())),
        );
    } else {
        legend.push((
            GREY.mix(0.75).stroke_width(1),
            false,
            format!("{} images, one line each", curves.len()),
        ));
    }
    legend.extend(
        means
            .iter()
            .map(|(c, label, _)| (c.stroke_width(3), false, label.to_string())),
    );
    let (_, h) = area.dim_in_pixel();
    let (plot, below) = area.split_vertically(h - legend_height(legend.len(), 1).min(h / 2));
    let xs = layer_range(
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.0 as usize))
            .chain(means.iter().flat_map(|m| m.2.iter().map(|p| p.0 as usize))),
    );
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .margin_right(24)
        .caption(title, font_style(15.0))
        .x_label_area_size(40)
        .y_label_area_size(52)
        .build_cartesian_2d(xs.clone(), 0f64..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("probability")
        .x_labels(((xs.end - xs.start) as usize + 1).min(16))
        .label_style(font_style(12.0))
        .axis_desc_style(font_style(13.0))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, c) in curves.iter().enumerate() {
        chart.draw_series(LineSeries::new(c.points.clone(), style_of(i)))?;
    }
    for (color, _, data) in means {
        chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(3)).point_size(3))?;
    }
    draw_legend(&below, &legend, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_font_draws_the_whitespace_marks() {
        for c in ['␣', '↵', '⇥', '∅', '…', '“', '”', '·', '–', '\u{fffd}'] {
            assert_ne!(font().unwrap().glyph_id(c).0, 0, "{c}");
        }
        assert_eq!(display_token(" red\n"), "␣red↵");
        assert_eq!(display_token("的"), "\\u{7684}");
        assert_eq!(display_token("\u{1}"), "\\u{1}");
    }

    #[test]
    fn stems_are_distinct_and_keep_no_dots() {
        let a = case_stem("a.png", "Color of the main object:");
        let b = case_stem("a_png", "Color of the main object:");
        assert_ne!(a, b);
        assert!(!a.contains('.'), "{a}");
        assert!(a.starts_with("a_png__color-of-the-main-object-"), "{a}");
        assert_eq!(
            with_ext(Path::new("x/a_png__c-1"), "png"),
            Path::new("x/a_png__c-1.png")
        );
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        let s = fit("a long token that does not fit", 12.0, 60.0);
        assert!(s.ends_with('…'));
        assert!(text_width(&s, 12.0) <= 60.0);
    }
}
