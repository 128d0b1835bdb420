//! Printing results: aligned tables for people, JSON or YAML for scripts.

use crate::{CliError, Format};

/// A command's result: its data, and how a person reads it.
#[derive(Debug, Default)]
pub struct Out {
    pub value: serde_json::Value,
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Lines printed instead of (or after) the table for people.
    pub text: Vec<String>,
}

impl Out {
    pub fn value(value: serde_json::Value) -> Out {
        Out { value, ..Out::default() }
    }

    pub fn print(&self, format: Format) -> Result<(), CliError> {
        let s = match format {
            Format::Json => {
                serde_json::to_string_pretty(&self.value).map_err(|e| CliError::Io(e.to_string()))?
            }
            Format::Yaml => serde_yaml::to_string(&self.value).map_err(|e| CliError::Io(e.to_string()))?,
            Format::Table => {
                let mut out = table(&self.headers, &self.rows);
                for t in &self.text {
                    out.push_str(t);
                    out.push('\n');
                }
                out.trim_end().to_owned()
            }
        };
        #[allow(clippy::print_stdout)]
        {
            println!("{s}");
        }
        Ok(())
    }
}

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    if headers.is_empty() {
        return String::new();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align() {
        let t = super::table(
            &["NAME", "SIZE"],
            &[vec!["a".into(), "1 GiB".into()], vec!["long-name".into(), "2 MiB".into()]],
        );
        assert_eq!(t, "NAME       SIZE\na          1 GiB\nlong-name  2 MiB\n");
    }
}
