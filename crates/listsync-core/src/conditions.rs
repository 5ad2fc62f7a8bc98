//! The JSON condition tree a CRM UI produces, compiled to a SQL predicate.
//!
//! This is the path user input takes, so the output must be immune to injection: column names
//! are checked against the table and emitted as quoted identifiers, values only ever appear as
//! escape-string literals (`E'...'`, which mean the same whatever `standard_conforming_strings`
//! says), and the operator comes from a fixed list. The predicate is then compiled like any
//! other (`filter::compile`), so whatever this emits is checked again by PostgreSQL's parser.

use serde_json::{Map, Value};
use std::fmt;

/// What the compiler needs to know about a column to choose the right SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Array,
    Date,
    Timestamp,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConditionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: {}", self.path, self.message)
    }
}

type Result<T> = std::result::Result<T, ConditionError>;

/// Compiles `tree` to a SQL boolean expression. `column_kind` answers `None` for a column the
/// table does not have.
pub fn to_sql(tree: &Value, column_kind: &dyn Fn(&str) -> Option<ColumnKind>) -> Result<String> {
    Compiler { column_kind }.node(tree, "$")
}

struct Compiler<'a> {
    column_kind: &'a dyn Fn(&str) -> Option<ColumnKind>,
}

fn fail<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(ConditionError {
        path: path.to_string(),
        message: message.into(),
    })
}

impl Compiler<'_> {
    fn node(&self, node: &Value, path: &str) -> Result<String> {
        let Some(object) = node.as_object() else {
            return fail(path, "a condition must be a JSON object");
        };
        let combinator = ["all", "any", "not"]
            .into_iter()
            .find(|key| object.contains_key(*key));
        match combinator {
            Some(key) => {
                if object.len() != 1 {
                    return fail(
                        path,
                        format!("\"{key}\" must be the only key of its object"),
                    );
                }
                self.combination(key, &object[key], &format!("{path}.{key}"))
            }
            None => self.leaf(object, path),
        }
    }

    fn combination(&self, key: &str, operand: &Value, path: &str) -> Result<String> {
        if key == "not" {
            return Ok(format!("(NOT {})", self.node(operand, path)?));
        }
        let Some(items) = operand.as_array() else {
            return fail(path, format!("\"{key}\" takes an array of conditions"));
        };
        if items.is_empty() {
            return Ok(if key == "all" { "true" } else { "false" }.to_string());
        }
        let joiner = if key == "all" { " AND " } else { " OR " };
        let parts = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.node(item, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        Ok(format!("({})", parts.join(joiner)))
    }

    fn leaf(&self, leaf: &Map<String, Value>, path: &str) -> Result<String> {
        for key in leaf.keys() {
            if !matches!(key.as_str(), "column" | "op" | "value" | "annual") {
                return fail(
                    path,
                    format!("unknown key \"{key}\" (a condition has column, op, value)"),
                );
            }
        }
        let Some(column) = leaf.get("column").and_then(Value::as_str) else {
            return fail(path, "\"column\" (a string) is required");
        };
        let Some(kind) = (self.column_kind)(column) else {
            return fail(
                &format!("{path}.column"),
                format!("column \"{column}\" does not exist"),
            );
        };
        let Some(op) = leaf.get("op").and_then(Value::as_str) else {
            return fail(path, "\"op\" (a string) is required");
        };
        let annual = match leaf.get("annual") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return fail(
                    &format!("{path}.annual"),
                    "\"annual\" must be true or false",
                );
            }
        };
        if annual && !matches!(op, "within_last_days" | "within_next_days") {
            return fail(
                &format!("{path}.annual"),
                "\"annual\" applies only to within_last_days and within_next_days",
            );
        }
        let col = quote_identifier(column);
        let value = leaf.get("value");
        let value_path = format!("{path}.value");
        let needs_no_value = matches!(op, "is_null" | "is_not_null");
        if needs_no_value && value.is_some() {
            return fail(&value_path, format!("\"{op}\" takes no value"));
        }
        let value = || {
            value.ok_or_else(|| ConditionError {
                path: value_path.clone(),
                message: format!("\"{op}\" needs a value"),
            })
        };

        Ok(match op {
            "=" | "!=" | "<" | "<=" | ">" | ">=" => {
                let sql_op = if op == "!=" { "<>" } else { op };
                format!(
                    "({col} {sql_op} {})",
                    scalar_literal(value()?, &value_path)?
                )
            }
            "in" | "not_in" => {
                let Some(items) = value()?.as_array() else {
                    return fail(&value_path, format!("\"{op}\" takes an array of values"));
                };
                if items.is_empty() {
                    return Ok(if op == "in" { "false" } else { "true" }.to_string());
                }
                let literals = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| scalar_literal(v, &format!("{value_path}[{i}]")))
                    .collect::<Result<Vec<_>>>()?;
                let negation = if op == "in" { "" } else { "NOT " };
                format!("({col} {negation}IN ({}))", literals.join(", "))
            }
            "contains" => {
                let needle = scalar_literal(value()?, &value_path)?;
                match kind {
                    ColumnKind::Array => format!("({needle} = ANY ({col}))"),
                    _ => format!("(strpos(lower({col}::text), lower({needle})) > 0)"),
                }
            }
            "starts_with" => {
                let prefix = scalar_literal(value()?, &value_path)?;
                format!("starts_with(lower({col}::text), lower({prefix}))")
            }
            "is_null" => format!("({col} IS NULL)"),
            "is_not_null" => format!("({col} IS NOT NULL)"),
            "between" => {
                let bounds = value()?.as_array().filter(|b| b.len() == 2);
                let Some(bounds) = bounds else {
                    return fail(
                        &value_path,
                        "\"between\" takes an array of two values [low, high]",
                    );
                };
                let low = scalar_literal(&bounds[0], &format!("{value_path}[0]"))?;
                let high = scalar_literal(&bounds[1], &format!("{value_path}[1]"))?;
                format!("({col} BETWEEN {low} AND {high})")
            }
            "within_last_days" | "within_next_days" => {
                let days = value()?.as_u64().filter(|d| *d <= 36_600);
                let Some(days) = days else {
                    return fail(
                        &value_path,
                        format!("\"{op}\" takes a whole number of days from 0 to 36600"),
                    );
                };
                let past = op == "within_last_days";
                match (kind, annual) {
                    (ColumnKind::Date | ColumnKind::Timestamp, true) => {
                        anniversary_window(&col, days, past)
                    }
                    (ColumnKind::Date, false) if past => {
                        format!("({col} BETWEEN current_date - {days} AND current_date)")
                    }
                    (ColumnKind::Date, false) => {
                        format!("({col} BETWEEN current_date AND current_date + {days})")
                    }
                    (ColumnKind::Timestamp, false) if past => {
                        format!("({col} BETWEEN now() - interval '{days} days' AND now())")
                    }
                    (ColumnKind::Timestamp, false) => {
                        format!("({col} BETWEEN now() AND now() + interval '{days} days')")
                    }
                    _ => {
                        return fail(
                            &format!("{path}.column"),
                            format!(
                                "\"{op}\" needs a date or timestamp column, and \"{column}\" is not one"
                            ),
                        );
                    }
                }
            }
            other => {
                return fail(
                    &format!("{path}.op"),
                    format!(
                        "unknown operator \"{other}\" (one of = != < <= > >= in not_in contains starts_with \
                         is_null is_not_null between within_last_days within_next_days)"
                    ),
                );
            }
        })
    }
}

/// Whether the yearly anniversary of `col` (a birthday, a contract date) falls within `days`
/// days before or after today. `age(d - 1, col)` counts the years completed before day `d`, so
/// an anniversary that is today counts in both directions; 29 February falls on 28 February in
/// other years.
fn anniversary_window(col: &str, days: u64, past: bool) -> String {
    if past {
        let last = format!(
            "({col}::date + extract(year from age(current_date, {col}::date))::int * interval '1 year')::date"
        );
        format!("(current_date - {last} BETWEEN 0 AND {days})")
    } else {
        let next = format!(
            "({col}::date + (extract(year from age(current_date - 1, {col}::date))::int + 1) * interval '1 year')::date"
        );
        format!("({next} - current_date BETWEEN 0 AND {days})")
    }
}

fn scalar_literal(value: &Value, path: &str) -> Result<String> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => {
            return fail(
                path,
                "null is not a value to compare with (use is_null / is_not_null)",
            );
        }
        Value::Array(_) | Value::Object(_) => {
            return fail(path, "expected a string, number or boolean");
        }
    };
    if text.contains('\0') {
        return fail(path, "values cannot contain the NUL character");
    }
    Ok(escape_literal(&text))
}

/// An escape-string literal: backslashes and quotes are doubled, so the value can never end the
/// literal early whatever the server's `standard_conforming_strings`.
pub fn escape_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A double-quoted identifier (always quoted, so keywords and mixed case are safe).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn kinds(column: &str) -> Option<ColumnKind> {
        match column {
            "city" | "email" | "name" => Some(ColumnKind::Text),
            "tags" => Some(ColumnKind::Array),
            "birthday" => Some(ColumnKind::Date),
            "last_order_at" => Some(ColumnKind::Timestamp),
            "ltv" | "age" => Some(ColumnKind::Other),
            _ => None,
        }
    }

    fn sql(tree: Value) -> String {
        to_sql(&tree, &kinds).unwrap()
    }

    fn error(tree: Value) -> ConditionError {
        to_sql(&tree, &kinds).unwrap_err()
    }

    #[test]
    fn compiles_the_design_example() {
        let tree = json!({"all": [
            {"column": "city", "op": "=", "value": "Moscow"},
            {"column": "ltv", "op": ">", "value": 1000},
            {"not": {"column": "tags", "op": "contains", "value": "deleted"}}
        ]});
        assert_eq!(
            sql(tree),
            "((\"city\" = E'Moscow') AND (\"ltv\" > E'1000') AND (NOT (E'deleted' = ANY (\"tags\"))))"
        );
    }

    #[test]
    fn quotes_survive_hostile_values() {
        let hostile = "x'); DROP TABLE contacts; --\\' OR 1=1 \u{1F600} \"q\"";
        let out = sql(json!({"column": "name", "op": "=", "value": hostile}));
        assert_eq!(
            out,
            "(\"name\" = E'x''); DROP TABLE contacts; --\\\\'' OR 1=1 \u{1F600} \"q\"')"
        );
    }

    #[test]
    fn hostile_column_names_are_refused_not_quoted_through() {
        let e = error(json!({"column": "city\" = '' OR true --", "op": "=", "value": 1}));
        assert_eq!(e.path, "$.column");
        assert!(e.message.contains("does not exist"));
    }

    #[test]
    fn unknown_operators_and_keys_are_refused() {
        assert_eq!(
            error(json!({"column": "city", "op": "; DROP", "value": 1})).path,
            "$.op"
        );
        assert!(
            error(json!({"column": "city", "op": "=", "value": 1, "sql": "true"}))
                .message
                .contains("unknown key")
        );
        assert!(
            error(json!({"all": [], "any": []}))
                .message
                .contains("only key")
        );
        assert!(error(json!(["city"])).message.contains("JSON object"));
    }

    #[test]
    fn empty_combinations_have_their_identity() {
        assert_eq!(sql(json!({"all": []})), "true");
        assert_eq!(sql(json!({"any": []})), "false");
        assert_eq!(
            sql(json!({"column": "city", "op": "in", "value": []})),
            "false"
        );
        assert_eq!(
            sql(json!({"column": "city", "op": "not_in", "value": []})),
            "true"
        );
    }

    #[test]
    fn every_operator_has_a_form() {
        assert_eq!(
            sql(json!({"column": "city", "op": "!=", "value": "A"})),
            "(\"city\" <> E'A')"
        );
        assert_eq!(
            sql(json!({"column": "city", "op": "not_in", "value": ["A", "B"]})),
            "(\"city\" NOT IN (E'A', E'B'))"
        );
        assert_eq!(
            sql(json!({"column": "city", "op": "contains", "value": "os"})),
            "(strpos(lower(\"city\"::text), lower(E'os')) > 0)"
        );
        assert_eq!(
            sql(json!({"column": "email", "op": "starts_with", "value": "ann"})),
            "starts_with(lower(\"email\"::text), lower(E'ann'))"
        );
        assert_eq!(
            sql(json!({"column": "email", "op": "is_null"})),
            "(\"email\" IS NULL)"
        );
        assert_eq!(
            sql(json!({"column": "age", "op": "between", "value": [18, 65]})),
            "(\"age\" BETWEEN E'18' AND E'65')"
        );
        assert_eq!(
            sql(json!({"column": "last_order_at", "op": "within_last_days", "value": 30})),
            "(\"last_order_at\" BETWEEN now() - interval '30 days' AND now())"
        );
        assert!(
            sql(
                json!({"column": "birthday", "op": "within_next_days", "value": 7, "annual": true})
            )
            .contains("age(current_date - 1")
        );
    }

    #[test]
    fn values_are_checked() {
        assert!(
            error(json!({"column": "city", "op": "="}))
                .message
                .contains("needs a value")
        );
        assert!(
            error(json!({"column": "city", "op": "=", "value": null}))
                .message
                .contains("is_null")
        );
        assert!(
            error(json!({"column": "city", "op": "is_null", "value": 1}))
                .message
                .contains("takes no value")
        );
        assert!(
            error(json!({"column": "city", "op": "between", "value": [1]}))
                .message
                .contains("two values")
        );
        assert!(
            error(json!({"column": "city", "op": "within_last_days", "value": 3}))
                .message
                .contains("date")
        );
        assert!(
            error(json!({"column": "birthday", "op": "within_last_days", "value": -3}))
                .message
                .contains("whole number")
        );
        assert!(
            error(json!({"column": "city", "op": "=", "value": "a\u{0}b"}))
                .message
                .contains("NUL")
        );
        assert_eq!(
            error(json!({"any": [{"column": "city", "op": "=", "value": {}}]})).path,
            "$.any[0].value"
        );
    }
}
