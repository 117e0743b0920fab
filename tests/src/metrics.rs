//! A parser for the Prometheus text format, enough to read the agent's counters in tests.

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses exposition text; lines that are comments or do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    /// Sum over every series of `name` (all label values).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Sum over series of `name` whose labels include every pair in `labels`.
    pub fn sum_where(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Lines of the `hoshino_` series for printing, histograms buckets left out.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for s in self
            .samples
            .iter()
            .filter(|s| s.name.starts_with("hoshino_") && !s.name.ends_with("_bucket"))
        {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", labels.join(","))
            };
            out.push_str(&format!("{}{} {}\n", s.name, labels, s.value));
        }
        out
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (line.get(..close + 1)?, line.get(close + 1..)?)
        }
        None => line.split_at(line.find(char::is_whitespace)?),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match series.find('{') {
        Some(open) => (
            series.get(..open)?,
            parse_labels(series.get(open + 1..series.len() - 1)?),
        ),
        None => (series, Vec::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let Some(body) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, esc)) = chars.next() {
                        value.push(if esc == 'n' { '\n' } else { esc });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = body.get(end..).unwrap_or("");
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_and_plain_series_are_summed() {
        let m = Metrics::parse(
            "# HELP x\nhoshino_s3_requests_total{op=\"put\"} 3\nhoshino_s3_requests_total{op=\"get\"} 4\nhoshino_heartbeat_idle 1\n",
        );
        assert_eq!(m.sum("hoshino_s3_requests_total"), 7.0);
        assert_eq!(
            m.sum_where("hoshino_s3_requests_total", &[("op", "get")]),
            4.0
        );
        assert_eq!(m.sum("hoshino_heartbeat_idle"), 1.0);
    }

    #[test]
    fn escaped_label_values_parse() {
        let m = Metrics::parse("a{reason=\"x\\\"y\",b=\"z\"} 2.5");
        assert_eq!(m.sum_where("a", &[("reason", "x\"y"), ("b", "z")]), 2.5);
    }
}
