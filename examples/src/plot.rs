//! Loss curves as a PNG, with no system fonts.
//!
//! plotters rasterises the lines and writes the PNG; every piece of text (title, tick values, axis names,
//! legend) is drawn by [`font`], a 5×9 pixel bitmap font for printable ASCII that lives in this file. That keeps
//! the crate free of fontconfig/freetype and of font files: plotters' own text needs either a system font
//! (its `ttf` feature) or TTF bytes registered at run time (`ab_glyph`), and none ships with Colony.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

/// One line of a chart: a label for the legend and its `(x, y)` points, drawn in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub label: String,
    /// Points in drawing order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
const MARGIN_TOP: i32 = 50;
const MARGIN_BOTTOM: i32 = 60;
const MARGIN_LEFT: i32 = 90;
const MARGIN_RIGHT: i32 = 30;
/// Tableau's ten categorical colours, then repeated.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(225, 225, 225);
const TEXT: RGBColor = RGBColor(30, 30, 30);

/// Draws `series` as coloured lines on one pair of linear axes, with a title, tick values, the x axis named
/// `x_label`, the y axis named "loss" and a legend, and writes a 1000×600 PNG to `path`.
///
/// The axes span every finite point (a single point or a flat line gets a small range around it); with no
/// finite point at all the chart is empty axes from 0 to 1.
///
/// ```no_run
/// use colony_examples::plot::{Series, plot_loss_curves};
/// let solo = Series { label: "solo".into(), points: vec![(0.0, 2.3), (100.0, 0.9), (200.0, 0.5)] };
/// plot_loss_curves("loss.png".as_ref(), "validation loss", "steps", &[solo])?;
/// # anyhow::Ok(())
/// ```
pub fn plot_loss_curves(path: &Path, title: &str, x_label: &str, series: &[Series]) -> anyhow::Result<()> {
    let finite = || {
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (x_range, y_range) = match finite().next() {
        None => ((0.0, 1.0), (0.0, 1.0)),
        Some(&(x, y)) => {
            let fold = |range: (f64, f64), v: f64| (range.0.min(v), range.1.max(v));
            let x_range = finite().fold((x, x), |range, p| fold(range, p.0));
            let y_range = finite().fold((y, y), |range, p| fold(range, p.1));
            (widen(x_range, 0.0), widen(y_range, 0.05))
        }
    };

    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plotting_error)?;
    let chart = ChartBuilder::on(&root)
        .margin_top(MARGIN_TOP)
        .margin_bottom(MARGIN_BOTTOM)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
        .map_err(plotting_error)?;
    let (x_pixels, y_pixels) = chart.plotting_area().get_pixel_range();
    let (left, right, top, bottom) = (x_pixels.start, x_pixels.end - 1, y_pixels.start, y_pixels.end - 1);

    // Grid and tick values.
    for x in ticks(x_range, 8) {
        let (px, _) = chart.backend_coord(&(x, y_range.0));
        root.draw(&PathElement::new([(px, top), (px, bottom)], GRID))
            .map_err(plotting_error)?;
        let text = format_tick(x, x_range);
        font::draw(&root, &text, (px - font::width(&text, 1) / 2, bottom + 8), 1, TEXT)?;
    }
    for y in ticks(y_range, 6) {
        let (_, py) = chart.backend_coord(&(x_range.0, y));
        root.draw(&PathElement::new([(left, py), (right, py)], GRID))
            .map_err(plotting_error)?;
        let text = format_tick(y, y_range);
        font::draw(
            &root,
            &text,
            (left - 8 - font::width(&text, 1), py - font::HEIGHT / 2),
            1,
            TEXT,
        )?;
    }
    root.draw(&PathElement::new([(left, top), (left, bottom), (right, bottom)], TEXT))
        .map_err(plotting_error)?;

    // Lines, clipped to the plotting area by the chart.
    let mut chart = chart;
    for (index, s) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(plotting_error)?;
    }

    // Title, axis names, legend.
    let centre = (left + right) / 2;
    font::draw(
        &root,
        title,
        (centre - font::width(title, 2) / 2, (MARGIN_TOP - 2 * font::HEIGHT) / 2),
        2,
        TEXT,
    )?;
    font::draw(
        &root,
        x_label,
        (centre - font::width(x_label, 1) / 2, bottom + 30),
        1,
        TEXT,
    )?;
    font::draw_vertical(
        &root,
        "loss",
        (20, (top + bottom) / 2 + font::width("loss", 1) / 2),
        1,
        TEXT,
    )?;
    draw_legend(&root, series, (right - 10, top + 10))?;

    root.present()
        .map_err(plotting_error)
        .with_context(|| format!("writing the chart to {}", path.display()))
}

/// A white box with a line sample and the label of each series, its top-right corner at `corner`.
fn draw_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    series: &[Series],
    corner: (i32, i32),
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    if series.is_empty() {
        return Ok(());
    }
    const SAMPLE: i32 = 24;
    const ROW: i32 = font::HEIGHT + 6;
    let text_width = series.iter().map(|s| font::width(&s.label, 1)).max().unwrap_or(0);
    let (width, height) = (SAMPLE + 24 + text_width, ROW * series.len() as i32 + 8);
    let (x0, y0) = (corner.0 - width, corner.1);
    root.draw(&Rectangle::new([(x0, y0), (x0 + width, y0 + height)], WHITE.filled()))
        .map_err(plotting_error)?;
    root.draw(&Rectangle::new([(x0, y0), (x0 + width, y0 + height)], GRID))
        .map_err(plotting_error)?;
    for (index, s) in series.iter().enumerate() {
        let y = y0 + 6 + ROW * index as i32;
        let colour = COLOURS[index % COLOURS.len()];
        let mid = y + font::CAP_HEIGHT / 2;
        root.draw(&PathElement::new(
            [(x0 + 8, mid), (x0 + 8 + SAMPLE, mid)],
            colour.stroke_width(2),
        ))
        .map_err(plotting_error)?;
        font::draw(root, &s.label, (x0 + 16 + SAMPLE, y), 1, TEXT)?;
    }
    Ok(())
}

/// `(min, max)` widened by `fraction` of its span on each side, or to a unit-sized range around a single value.
fn widen((min, max): (f64, f64), fraction: f64) -> (f64, f64) {
    let span = max - min;
    if span > f64::EPSILON * max.abs().max(min.abs()).max(1e-300) {
        (min - span * fraction, max + span * fraction)
    } else {
        let half = (min.abs() * 0.1).max(0.5);
        (min - half, max + half)
    }
}

/// Round tick values inside `range`, about `target` of them: steps of 1, 2 or 5 times a power of ten.
fn ticks((min, max): (f64, f64), target: usize) -> Vec<f64> {
    let step = tick_step(max - min, target);
    let first = (min / step).ceil() as i64;
    let last = (max / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn tick_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    if step.is_finite() && step > 0.0 { step } else { 1.0 }
}

/// A tick value with as many decimals as the tick step needs.
fn format_tick(value: f64, range: (f64, f64)) -> String {
    let step = tick_step(range.1 - range.0, 6);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let text = format!("{value:.decimals$}");
    // "-0.00" reads oddly on an axis.
    if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

fn plotting_error<E: std::error::Error + Send + Sync + 'static>(error: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}

/// A 5×9 bitmap font for printable ASCII (capitals and digits 7 rows tall, two more rows for descenders),
/// drawn as filled squares of `scale × scale` pixels. Characters outside printable ASCII are drawn as `?`.
pub mod font {
    use anyhow::anyhow;
    use plotters::coord::Shift;
    use plotters::prelude::*;

    /// Rows of a glyph at scale 1.
    pub const HEIGHT: i32 = 9;
    /// Rows above the baseline.
    pub const CAP_HEIGHT: i32 = 7;
    /// Columns per glyph, including one column of spacing.
    pub const ADVANCE: i32 = 6;

    /// Width in pixels of `text` at `scale`.
    pub fn width(text: &str, scale: i32) -> i32 {
        text.chars().count() as i32 * ADVANCE * scale
    }

    /// Draws `text` left to right with its top-left corner at `origin`.
    pub fn draw<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        text: &str,
        origin: (i32, i32),
        scale: i32,
        colour: RGBColor,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        for (index, c) in text.chars().enumerate() {
            let x = origin.0 + index as i32 * ADVANCE * scale;
            for (row, col) in ink(c) {
                dot(area, (x + col * scale, origin.1 + row * scale), scale, colour)?;
            }
        }
        Ok(())
    }

    /// Draws `text` bottom to top (turned 90° anticlockwise), starting at `origin`, the bottom-left corner
    /// of the first character.
    pub fn draw_vertical<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        text: &str,
        origin: (i32, i32),
        scale: i32,
        colour: RGBColor,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        for (index, c) in text.chars().enumerate() {
            let y = origin.1 - index as i32 * ADVANCE * scale;
            for (row, col) in ink(c) {
                dot(area, (origin.0 + row * scale, y - (col + 1) * scale), scale, colour)?;
            }
        }
        Ok(())
    }

    /// `(row, column)` of every inked pixel of `c`.
    fn ink(c: char) -> impl Iterator<Item = (i32, i32)> {
        let glyph = glyph(c);
        (0..HEIGHT).flat_map(move |row| {
            (0..5)
                .filter(move |col| glyph[row as usize] & (0x10 >> col) != 0)
                .map(move |col| (row, col))
        })
    }

    fn dot<DB: DrawingBackend>(
        area: &DrawingArea<DB, Shift>,
        (x, y): (i32, i32),
        scale: i32,
        colour: RGBColor,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let result = if scale == 1 {
            area.draw_pixel((x, y), &colour)
        } else {
            area.draw(&Rectangle::new([(x, y), (x + scale, y + scale)], colour.filled()))
        };
        result.map_err(|error| anyhow!("drawing text: {error}"))
    }

    /// The rows of `c`'s glyph, bit 4 the leftmost column.
    pub fn glyph(c: char) -> [u8; 9] {
        let index = (c as u32).wrapping_sub(0x20) as usize;
        GLYPHS.get(index).copied().unwrap_or(GLYPHS[usize::from(b'?' - 0x20)])
    }

    /// Glyphs of `' '..='~'`, in code order.
    const GLYPHS: [[u8; 9]; 95] = [
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // ' '
        [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00], // '!'
        [0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '"'
        [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00, 0x00], // '#'
        [0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00, 0x00], // '$'
        [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00], // '%'
        [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00, 0x00], // '&'
        [0x04, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '\''
        [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00], // '('
        [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00], // ')'
        [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00, 0x00], // '*'
        [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00, 0x00], // '+'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x04, 0x08], // ','
        [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00], // '-'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00, 0x00], // '.'
        [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00], // '/'
        [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00, 0x00], // '0'
        [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // '1'
        [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // '2'
        [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00, 0x00], // '3'
        [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00, 0x00], // '4'
        [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00, 0x00], // '5'
        [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00, 0x00], // '6'
        [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00], // '7'
        [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00, 0x00], // '8'
        [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00, 0x00], // '9'
        [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00, 0x00], // ':'
        [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x04, 0x08, 0x00], // ';'
        [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00], // '<'
        [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00], // '='
        [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00], // '>'
        [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00], // '?'
        [0x0E, 0x11, 0x01, 0x0D, 0x15, 0x15, 0x0E, 0x00, 0x00], // '@'
        [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // 'A'
        [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00, 0x00], // 'B'
        [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // 'C'
        [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00, 0x00], // 'D'
        [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00, 0x00], // 'E'
        [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // 'F'
        [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00, 0x00], // 'G'
        [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00], // 'H'
        [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'I'
        [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00, 0x00], // 'J'
        [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00], // 'K'
        [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00, 0x00], // 'L'
        [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00], // 'M'
        [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00], // 'N'
        [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'O'
        [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00], // 'P'
        [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00, 0x00], // 'Q'
        [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00, 0x00], // 'R'
        [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00, 0x00], // 'S'
        [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'T'
        [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'U'
        [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // 'V'
        [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00, 0x00], // 'W'
        [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00, 0x00], // 'X'
        [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // 'Y'
        [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00, 0x00], // 'Z'
        [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00, 0x00], // '['
        [0x00, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00, 0x00, 0x00], // '\\'
        [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00, 0x00], // ']'
        [0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '^'
        [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00], // '_'
        [0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00], // '`'
        [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00, 0x00], // 'a'
        [0x10, 0x10, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x00, 0x00], // 'b'
        [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00], // 'c'
        [0x01, 0x01, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x00, 0x00], // 'd'
        [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00, 0x00], // 'e'
        [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00, 0x00], // 'f'
        [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'g'
        [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'h'
        [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'i'
        [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C], // 'j'
        [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00], // 'k'
        [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00], // 'l'
        [0x00, 0x00, 0x1A, 0x15, 0x15, 0x15, 0x15, 0x00, 0x00], // 'm'
        [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00], // 'n'
        [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00], // 'o'
        [0x00, 0x00, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10], // 'p'
        [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01], // 'q'
        [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00], // 'r'
        [0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E, 0x00, 0x00], // 's'
        [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00], // 't'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00, 0x00], // 'u'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00], // 'v'
        [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00, 0x00], // 'w'
        [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00, 0x00], // 'x'
        [0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E], // 'y'
        [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00], // 'z'
        [0x03, 0x04, 0x04, 0x08, 0x04, 0x04, 0x03, 0x00, 0x00], // '{'
        [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00], // '|'
        [0x18, 0x04, 0x04, 0x02, 0x04, 0x04, 0x18, 0x00, 0x00], // '}'
        [0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00, 0x00], // '~'
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        assert_eq!(ticks((0.0, 10.0), 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(
            ticks((0.13, 0.61), 5),
            vec![0.2, 0.30000000000000004, 0.4, 0.5, 0.6000000000000001]
        );
        assert_eq!(format_tick(0.30000000000000004, (0.13, 0.61)), "0.3");
        assert_eq!(format_tick(-0.0001, (-1.0, 1.0)), "0.0");
        assert_eq!(format_tick(2000.0, (0.0, 10_000.0)), "2000");
    }

    #[test]
    fn widen_gives_a_flat_line_some_height() {
        assert_eq!(widen((2.0, 2.0), 0.05), (1.5, 2.5));
        assert_eq!(widen((0.0, 10.0), 0.05), (-0.5, 10.5));
    }

    #[test]
    fn every_printable_character_has_a_glyph_and_others_fall_back() {
        for c in ' '..='~' {
            let glyph = font::glyph(c);
            assert_eq!(glyph.iter().all(|&row| row == 0), c == ' ', "{c:?}");
            assert!(glyph.iter().all(|&row| row < 0x20), "{c:?} is wider than 5 columns");
        }
        assert_eq!(font::glyph('é'), font::glyph('?'));
    }
}
