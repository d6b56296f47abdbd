//! Walks a TOML table key by key, collecting every problem with its key path and a "did you
//! mean" hint for unknown keys. Shared by the agent config and the component manifest.

use serde::de::DeserializeOwned;

use crate::config::ConfigProblem;

/// Walks one TOML table, taking known keys and recording problems with their paths.
pub(crate) struct Walker<'a> {
    pub(crate) prefix: String,
    pub(crate) table: toml::Table,
    pub(crate) problems: &'a mut Vec<ConfigProblem>,
}

impl<'a> Walker<'a> {
    pub(crate) fn new(
        prefix: impl Into<String>,
        table: toml::Table,
        problems: &'a mut Vec<ConfigProblem>,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            table,
            problems,
        }
    }

    pub(crate) fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() || key.is_empty() {
            format!("{}{key}", self.prefix)
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub(crate) fn problem(&mut self, key: &str, problem: impl Into<String>) {
        let key = self.path(key);
        self.problems.push(ConfigProblem {
            key,
            problem: problem.into(),
        });
    }

    pub(crate) fn take<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let value = self.table.remove(key)?;
        match value.try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(key, e.message().trim().to_string());
                None
            }
        }
    }

    pub(crate) fn section(&mut self, key: &str) -> Option<Walker<'_>> {
        let path = self.path(key);
        match self.table.remove(key)? {
            toml::Value::Table(table) => Some(Walker {
                prefix: path,
                table,
                problems: self.problems,
            }),
            other => {
                self.problem(
                    key,
                    format!("expected a table `[{path}]`, found {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(crate) fn finish(self, known: &[&str]) {
        let Walker {
            prefix,
            table,
            problems,
        } = self;
        for key in table.keys() {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            let hint = closest(key, known)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_else(|| format!("; known keys here: {}", known.join(", ")));
            problems.push(ConfigProblem {
                key: path,
                problem: format!("unknown key{hint}"),
            });
        }
    }
}

/// The known key closest to `key` by edit distance, if it is a plausible typo.
pub(crate) fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
