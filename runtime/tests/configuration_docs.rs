//! `docs/configuration.md` and the code agree: its table of optimizer options names exactly the fields of
//! `CollaborativeOptions` (read from the struct's `Debug` output, so a new field fails this test until it
//! is documented), the defaults it states for the simple fields are the values `CollaborativeOptions::new`
//! sets, every configuration key of `[optimizer]` and `[node]` (read from `colony::config`'s structs) is
//! documented and every documented key exists, every flag it names is one the programs accept (Colony's
//! own flags, read from clap, or the examples' `TrainFlags`) and sets the key of its row, and the file
//! example is a valid configuration that shows every key.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args as _;
use colony::config::{Config, NodeSettings, OptimizerSettings};
use colony::membership::MembershipConfig;
use colony::optimizer::CollaborativeOptions;
use colony_offload::OptimizerConfig;

/// The heading of the options table in `docs/configuration.md`.
const OPTIONS_HEADING: &str = "## Optimizer options (`CollaborativeOptions`)";
/// The heading of the table of the optimizer rule's keys.
const RULE_HEADING: &str = "### Keys of the optimizer rule";
/// The heading of the `[node]` keys' table.
const NODE_HEADING: &str = "## Node settings (`[node]`)";
/// The heading of the section with the example file.
const FILE_HEADING: &str = "## The configuration file";

fn repository_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn options() -> CollaborativeOptions {
    CollaborativeOptions::new(256, OptimizerConfig::adam(0.001, 10))
}

/// The names of the top-level fields in a derived `Debug` output `Name { a: 1, b: Inner { c: 2 }, d: [..] }`:
/// the text before the first `: ` of every segment between commas at nesting depth 1. String and char
/// literals are copied whole, so that brackets or commas inside them do not count.
fn debug_field_names(debug: &str) -> Vec<String> {
    /// Ends a segment: its name, if any, is a field.
    fn finish(segment: &mut String, names: &mut Vec<String>) {
        let name = segment.trim().split(": ").next().unwrap_or_default().trim().to_string();
        if !name.is_empty() {
            names.push(name);
        }
        segment.clear();
    }
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut segment = String::new();
    let mut chars = debug.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                // A literal: copy through to its closing quote, honouring backslash escapes.
                if depth >= 1 {
                    segment.push(c);
                }
                while let Some(inner) = chars.next() {
                    if depth >= 1 {
                        segment.push(inner);
                    }
                    if inner == '\\' {
                        if let Some(escaped) = chars.next()
                            && depth >= 1
                        {
                            segment.push(escaped);
                        }
                    } else if inner == c {
                        break;
                    }
                }
                continue;
            }
            '{' | '[' | '(' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' | ']' | ')' => {
                if depth == 1 {
                    finish(&mut segment, &mut names);
                }
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    continue;
                }
            }
            ',' if depth == 1 => {
                finish(&mut segment, &mut names);
                continue;
            }
            _ => {}
        }
        if depth >= 1 {
            segment.push(c);
        }
    }
    names
}

/// One row of the options table: the option's name and its cells after the name.
struct Row {
    option: String,
    default: String,
    flag: String,
}

/// The rows of the options table.
fn documented_options(markdown: &str) -> Vec<Row> {
    table_rows(markdown, OPTIONS_HEADING)
}

/// The rows of a four-column table (name, default, meaning, flag): the lines that start with "| `" between
/// `heading` and the next heading.
fn table_rows(markdown: &str, heading: &str) -> Vec<Row> {
    let start = markdown
        .lines()
        .position(|line| line.trim() == heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no heading {heading:?}"));
    let mut rows = Vec::new();
    for line in markdown.lines().skip(start + 1) {
        let line = line.trim();
        if line.starts_with("## ") || line.starts_with("# ") || line.starts_with("### ") {
            break;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(
            cells.len(),
            4,
            "an options row must have 4 cells (option, default, meaning, flag), not {}: {line}",
            cells.len()
        );
        let option = cells[0]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .unwrap_or_else(|| panic!("the option cell must be one name in backticks: {line}"));
        rows.push(Row {
            option: option.to_string(),
            default: cells[1].to_string(),
            flag: cells[3].to_string(),
        });
    }
    assert!(!rows.is_empty(), "the table under {heading:?} has no rows");
    rows
}

/// The default cell of `option`'s row, if the table has one.
fn default_of<'a>(rows: &'a [Row], option: &str) -> Option<&'a str> {
    rows.iter()
        .find(|row| row.option == option)
        .map(|row| row.default.as_str())
}

/// How the docs write a duration: whole seconds as "15 s", anything else in milliseconds ("50 ms").
fn written_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[test]
fn debug_field_names_reads_only_the_top_level() {
    let debug = r#"Outer { a: 1, b: Inner { c: 2, d: [3, 4] }, e: Some("x, y: {z}"), f: Fixed(None), g: 'a' }"#;
    assert_eq!(debug_field_names(debug), ["a", "b", "e", "f", "g"]);
}

#[test]
fn every_option_is_documented_and_every_documented_option_exists() {
    let code: BTreeSet<String> = debug_field_names(&format!("{:?}", options())).into_iter().collect();
    assert!(
        code.contains("target_batch_size") && code.contains("shutdown_timeout"),
        "the Debug output of CollaborativeOptions was not parsed as expected: {code:?}"
    );
    let rows = documented_options(&repository_file("docs/configuration.md"));
    let mut documented = BTreeSet::new();
    for row in &rows {
        assert!(
            documented.insert(row.option.clone()),
            "docs/configuration.md documents `{}` twice",
            row.option
        );
    }
    let undocumented: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md and CollaborativeOptions disagree: options missing from the table: \
         {undocumented:?}; options in the table that CollaborativeOptions does not have: {unknown:?}"
    );
}

#[test]
fn documented_defaults_match_the_code() {
    let options = options();
    let rows = documented_options(&repository_file("docs/configuration.md"));
    let expected: Vec<(&str, String)> = vec![
        ("matchmaking_time", written_duration(options.matchmaking_time)),
        ("averaging_timeout", written_duration(options.averaging_timeout)),
        ("load_state_timeout", written_duration(options.load_state_timeout)),
        ("request_timeout", written_duration(options.request_timeout)),
        ("min_refresh_period", written_duration(options.min_refresh_period)),
        ("max_refresh_period", written_duration(options.max_refresh_period)),
        ("shutdown_timeout", written_duration(options.shutdown_timeout)),
        ("average_state_every", options.average_state_every.to_string()),
        ("min_group_size", options.min_group_size.to_string()),
        ("performance_ema_alpha", options.performance_ema_alpha.to_string()),
        ("delay_state_averaging", format!("`{}`", options.delay_state_averaging)),
        ("delay_grad_averaging", format!("`{}`", options.delay_grad_averaging)),
        ("reuse_grad_buffers", format!("`{}`", options.reuse_grad_buffers)),
        ("use_local_updates", format!("`{}`", options.use_local_updates)),
        ("auxiliary", format!("`{}`", options.auxiliary)),
        ("batch_size_per_step", format!("`{:?}`", options.batch_size_per_step)),
        ("client_mode", format!("`{:?}`", options.client_mode)),
        ("offload_optimizer", format!("`{:?}`", options.offload_optimizer)),
        ("delay_optimizer_step", format!("`{:?}`", options.delay_optimizer_step)),
        ("allreduce_timeout", format!("`{:?}`", options.allreduce_timeout)),
        ("next_chunk_timeout", format!("`{:?}`", options.next_chunk_timeout)),
        ("target_group_size", format!("`{:?}`", options.target_group_size)),
        ("bandwidth", format!("`{:?}`", options.bandwidth)),
        (
            "load_state_compression",
            format!("`Codec::{:?}`", options.load_state_compression),
        ),
        (
            "part_size_bytes",
            format!(
                "{} KiB ({} bytes)",
                options.part_size_bytes / 1024,
                options.part_size_bytes
            ),
        ),
    ];
    let mut wrong = Vec::new();
    for (option, text) in &expected {
        let Some(documented) = default_of(&rows, option) else {
            wrong.push(format!("`{option}`: not in the options table"));
            continue;
        };
        // The cell starts with the value; anything after it (a space, a parenthesis) explains it.
        let matches = documented == text
            || documented
                .strip_prefix(text.as_str())
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('('));
        if !matches {
            wrong.push(format!(
                "`{option}`: documented {documented:?}, the code's default is {text:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/configuration.md states wrong defaults:\n{}",
        wrong.join("\n")
    );
    // The defaults users ask about most, spelled out once more as plain text.
    assert_eq!(default_of(&rows, "matchmaking_time"), Some("15 s"));
    assert_eq!(default_of(&rows, "averaging_timeout"), Some("60 s"));
    assert_eq!(default_of(&rows, "average_state_every"), Some("1"));
    assert_eq!(default_of(&rows, "delay_state_averaging"), Some("`true`"));
}

/// The flags named in a flag cell: the words in backticks that start with `--`, up to `=` or a space.
fn named_flags(cell: &str) -> Vec<String> {
    cell.split('`')
        .filter(|part| part.starts_with("--"))
        .map(|part| {
            part.split(|c: char| c == '=' || c.is_whitespace())
                .next()
                .unwrap_or(part)
                .to_string()
        })
        .collect()
}

/// Colony's flags of `settings`: each long name and alias with the id (the key) of its argument.
fn clap_flags(command: clap::Command) -> Vec<(String, String)> {
    let mut flags = Vec::new();
    for argument in command.get_arguments() {
        let id = argument.get_id().to_string();
        for long in argument
            .get_long()
            .into_iter()
            .chain(argument.get_all_aliases().unwrap_or_default())
        {
            flags.push((format!("--{long}"), id.clone()));
        }
    }
    flags
}

fn optimizer_flags() -> Vec<(String, String)> {
    clap_flags(OptimizerSettings::augment_args(clap::Command::new("optimizer")))
}

fn node_flags() -> Vec<(String, String)> {
    clap_flags(NodeSettings::augment_args(clap::Command::new("node")))
}

/// The key a flag of `flags` sets.
fn key_of<'a>(flags: &'a [(String, String)], flag: &str) -> Option<&'a str> {
    flags.iter().find(|(long, _)| long == flag).map(|(_, id)| id.as_str())
}

/// The flags of the examples' own `TrainFlags` fields (read from the source: the examples crate is not a
/// dependency of the runtime).
fn train_flags() -> BTreeSet<String> {
    let swarm = repository_file("examples/src/swarm.rs");
    let start = swarm
        .find("pub struct TrainFlags {")
        .expect("examples/src/swarm.rs defines TrainFlags");
    let body = &swarm[start + "pub struct TrainFlags {".len()..];
    let body = &body[..body.find("\n}").expect("TrainFlags has a closing brace")];
    body.lines()
        .filter_map(|line| line.trim().strip_prefix("pub "))
        .filter_map(|rest| rest.split(':').next())
        .map(|field| format!("--{}", field.trim().replace('_', "-")))
        .collect()
}

#[test]
fn documented_flags_exist() {
    let markdown = repository_file("docs/configuration.md");
    let (optimizer, node, examples) = (optimizer_flags(), node_flags(), train_flags());
    let mut unknown = Vec::new();
    for row in documented_options(&markdown) {
        if row.flag == "—" {
            continue;
        }
        let named = named_flags(&row.flag);
        assert!(
            !named.is_empty(),
            "`{}`: the flag cell must name a flag in backticks or say —, not {:?}",
            row.option,
            row.flag
        );
        for flag in named {
            let known =
                key_of(&optimizer, &flag).is_some() || key_of(&node, &flag).is_some() || examples.contains(&flag);
            if !known {
                unknown.push(format!("`{}`: {flag}", row.option));
            }
            // A flag of the option's own name sets the option's key.
            if let Some(key) = key_of(&optimizer, &flag)
                && flag == format!("--{}", row.option.replace('_', "-"))
            {
                assert_eq!(key, row.option, "{flag} sets `{key}`, not `{}`", row.option);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/configuration.md names flags that no program accepts: {unknown:?}"
    );
}

#[test]
fn every_optimizer_key_is_documented_and_every_documented_key_exists() {
    let markdown = repository_file("docs/configuration.md");
    let flags = optimizer_flags();
    let keys: BTreeSet<&str> = OptimizerSettings::keys().iter().copied().collect();
    // The rule's keys have rows of their own; each row's flag sets that key.
    let mut documented = BTreeSet::new();
    for row in table_rows(&markdown, RULE_HEADING) {
        assert!(
            keys.contains(row.option.as_str()),
            "`{}` is documented but is no [optimizer] key",
            row.option
        );
        let named = named_flags(&row.flag);
        assert!(!named.is_empty(), "`{}`: no flag named", row.option);
        for flag in named {
            assert_eq!(
                key_of(&flags, &flag),
                Some(row.option.as_str()),
                "{flag} in the row of `{}`",
                row.option
            );
        }
        documented.insert(row.option.clone());
    }
    // The other keys are the options of the same name, whose rows name the key's flag.
    for row in documented_options(&markdown) {
        for flag in named_flags(&row.flag) {
            if let Some(key) = key_of(&flags, &flag)
                && key == row.option
            {
                documented.insert(key.to_string());
            }
        }
    }
    let undocumented: Vec<_> = keys.iter().filter(|k| !documented.contains(**k)).collect();
    assert!(
        undocumented.is_empty(),
        "[optimizer] keys that docs/configuration.md does not document (a row of their own name naming their \
         flag, or a row in {RULE_HEADING:?}): {undocumented:?}"
    );
}

#[test]
fn every_node_key_is_documented_and_every_documented_key_exists() {
    let markdown = repository_file("docs/configuration.md");
    let rows = table_rows(&markdown, NODE_HEADING);
    let flags = node_flags();
    let documented: BTreeSet<&str> = rows.iter().map(|row| row.option.as_str()).collect();
    let keys: BTreeSet<&str> = NodeSettings::keys().iter().copied().collect();
    assert_eq!(documented, keys, "the [node] table and NodeSettings disagree");
    for row in &rows {
        let named = named_flags(&row.flag);
        assert!(!named.is_empty(), "`{}`: no flag named", row.option);
        for flag in named {
            assert_eq!(
                key_of(&flags, &flag),
                Some(row.option.as_str()),
                "{flag} in the row of `{}`",
                row.option
            );
        }
    }
    // The defaults stated are MembershipConfig::new's and colony node's.
    let membership = MembershipConfig::new("run", None);
    let expected = [
        ("probe_period_ms", membership.swim.probe_period.as_millis().to_string()),
        (
            "suspect_timeout_ms",
            membership.swim.suspect_to_down_after.as_millis().to_string(),
        ),
        (
            "bootstrap_timeout_s",
            membership.bootstrap_timeout.as_secs().to_string(),
        ),
        ("bandwidth_mbps", membership.bandwidth_mbps.to_string()),
        ("run_id", format!("`\"{}\"`", colony::config::DEFAULT_RUN_ID)),
        ("transport", "`tcp`".to_string()),
        ("auxiliary", "`false`".to_string()),
    ];
    for (key, value) in expected {
        let documented = default_of(&rows, key).unwrap_or_default();
        assert!(
            documented == value || documented.starts_with(&format!("{value} ")),
            "`{key}`: documented default {documented:?}, the code's is {value:?}"
        );
    }
}

#[test]
fn the_example_file_is_valid_and_shows_every_key() {
    let markdown = repository_file("docs/configuration.md");
    let section = &markdown[markdown.find(FILE_HEADING).expect("the file section")..];
    let start = section.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").expect("the example ends")];
    let config = Config::from_toml(example, "the example in docs/configuration.md").unwrap();
    // Every key is set, or shown commented out (`# key = ...`).
    for (section, keys) in colony::config::sections() {
        let body = example
            .split(&format!("[{section}]\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("the example has no [{section}]"));
        let body = body.split("\n[").next().unwrap_or(body);
        for key in keys {
            let shown = body.lines().any(|line| {
                let line = line.trim_start_matches('#').trim_start();
                line.starts_with(&format!("{key} ="))
            });
            assert!(shown, "the example file does not show [{section}] {key}");
        }
    }
    // Its optimizer values are the defaults where the code has them.
    let tensors = [colony_averaging::tensor::TensorInfo::new("w", vec![10])];
    let options = config.optimizer.options(&tensors).unwrap();
    let defaults = CollaborativeOptions::new(options.target_batch_size, options.optimizer.clone());
    assert_eq!(
        format!("{options:?}"),
        format!("{defaults:?}"),
        "the example's values are the defaults"
    );
    let membership = NodeSettings {
        listen: None,
        initial_peers: None,
        ..config.node
    }
    .membership()
    .unwrap();
    let default_membership = MembershipConfig::new(colony::config::DEFAULT_RUN_ID, None);
    assert_eq!(membership.swim.probe_period, default_membership.swim.probe_period);
    assert_eq!(
        membership.swim.suspect_to_down_after,
        default_membership.swim.suspect_to_down_after
    );
    assert_eq!(membership.bootstrap_timeout, default_membership.bootstrap_timeout);
}
