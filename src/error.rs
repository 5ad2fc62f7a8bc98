//! The one error type of the SQL surface, and its mapping to SQLSTATEs.
//!
//! Every user-facing failure is an [`Error`]: a kind (which decides the SQLSTATE), a message that
//! names the object, and optionally a detail and a hint. Functions return `Result<_, Error>` and
//! the `#[pg_extern]` layer raises it with [`Error::raise`].

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::PgLogLevel;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    UndefinedObject,
    DuplicateObject,
    UndefinedColumn,
    UndefinedTable,
    InvalidParameter,
    InvalidName,
    SyntaxError,
    DatatypeMismatch,
    InvalidObjectDefinition,
    InsufficientPrivilege,
    FeatureNotSupported,
    ObjectNotInPrerequisiteState,
    DependentObjectsStillExist,
    ProviderUnavailable,
    ProviderRejected,
    Internal,
    NullValueNotAllowed,
    TriggerProtocolViolated,
    /// PostgreSQL's own error, re-raised with our context: its SQLSTATE is kept.
    Postgres(PgSqlErrorCode),
}

impl Kind {
    pub fn sqlstate(self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Kind::UndefinedObject => ERRCODE_UNDEFINED_OBJECT,
            Kind::DuplicateObject => ERRCODE_DUPLICATE_OBJECT,
            Kind::UndefinedColumn => ERRCODE_UNDEFINED_COLUMN,
            Kind::UndefinedTable => ERRCODE_UNDEFINED_TABLE,
            Kind::InvalidParameter => ERRCODE_INVALID_PARAMETER_VALUE,
            Kind::InvalidName => ERRCODE_INVALID_NAME,
            Kind::SyntaxError => ERRCODE_SYNTAX_ERROR,
            Kind::DatatypeMismatch => ERRCODE_DATATYPE_MISMATCH,
            Kind::InvalidObjectDefinition => ERRCODE_INVALID_OBJECT_DEFINITION,
            Kind::InsufficientPrivilege => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Kind::FeatureNotSupported => ERRCODE_FEATURE_NOT_SUPPORTED,
            Kind::ObjectNotInPrerequisiteState => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Kind::DependentObjectsStillExist => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            Kind::ProviderUnavailable => ERRCODE_CONNECTION_FAILURE,
            Kind::ProviderRejected => ERRCODE_FDW_ERROR,
            Kind::Internal => ERRCODE_INTERNAL_ERROR,
            Kind::NullValueNotAllowed => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            Kind::TriggerProtocolViolated => ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            Kind::Postgres(code) => code,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn not_found(what: &str, name: &str) -> Self {
        Error::new(
            Kind::UndefinedObject,
            format!("{what} \"{name}\" does not exist"),
        )
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(Kind::InvalidParameter, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Kind::Internal, message)
    }

    /// Puts the filter's name in front of the message: `filter "vip": ...`.
    pub fn in_filter(self, filter: &str) -> Self {
        self.in_object(&format!("filter \"{filter}\""))
    }

    /// Puts the object in front of the message: `field "FNAME" of filter "vip": ...`.
    pub fn in_object(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn report(&self) -> ErrorReport {
        let mut report =
            ErrorReport::new(self.kind.sqlstate(), self.message.clone(), "pg_listsync");
        if let Some(detail) = &self.detail {
            report = report.set_detail(detail.clone());
        }
        if let Some(hint) = &self.hint {
            report = report.set_hint(hint.clone());
        }
        report
    }

    /// Raises the error as a PostgreSQL ERROR; the transaction aborts.
    pub fn raise(self) -> ! {
        self.report().report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// A PostgreSQL ERROR inside SPI unwinds with its own SQLSTATE and never reaches this; what does
/// is pgrx's report of a call it could not make or a value it could not convert, each mapped
/// to the SQLSTATE PostgreSQL uses for that condition. Only SPI misuse is internal (XX000).
impl From<pgrx::spi::Error> for Error {
    fn from(e: pgrx::spi::Error) -> Self {
        use PgSqlErrorCode::*;
        use pgrx::spi::{SpiError, SpiErrorCodes};
        let code = match &e {
            SpiError::DatumError(_) => ERRCODE_DATATYPE_MISMATCH,
            SpiError::PreparedStatementArgumentMismatch { .. } => ERRCODE_PROTOCOL_VIOLATION,
            SpiError::CursorNotFound(_) => ERRCODE_INVALID_CURSOR_NAME,
            SpiError::SpiError(SpiErrorCodes::RelNotFound) => ERRCODE_UNDEFINED_TABLE,
            SpiError::SpiError(SpiErrorCodes::RelDuplicate) => ERRCODE_DUPLICATE_TABLE,
            SpiError::SpiError(SpiErrorCodes::NoAttribute) => ERRCODE_UNDEFINED_COLUMN,
            SpiError::SpiError(SpiErrorCodes::TypUnknown) => ERRCODE_UNDEFINED_OBJECT,
            SpiError::SpiError(SpiErrorCodes::NoOutFunc) => ERRCODE_UNDEFINED_FUNCTION,
            SpiError::SpiError(SpiErrorCodes::Transaction) => ERRCODE_INVALID_TRANSACTION_STATE,
            SpiError::SpiError(_) | SpiError::InvalidPosition | SpiError::NoTupleTable => {
                ERRCODE_INTERNAL_ERROR
            }
        };
        Error::new(Kind::Postgres(code), format!("SPI: {e}"))
    }
}

/// An argument of a public function that must not be NULL. The functions are not STRICT, so
/// that a NULL gets this error instead of a silent NULL result.
pub fn required<T>(value: Option<T>, argument: &str) -> T {
    value.unwrap_or_else(|| {
        Error::new(
            Kind::NullValueNotAllowed,
            format!("{argument} must not be NULL"),
        )
        .raise()
    })
}

/// Unwraps a result in a `#[pg_extern]` function, raising the error as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use pgrx::spi::{SpiError, SpiErrorCodes};

    #[test]
    fn spi_errors_keep_a_meaningful_sqlstate() {
        let code = |e: SpiError| Error::from(e).kind.sqlstate();
        assert_eq!(
            code(SpiError::CursorNotFound("c".into())),
            PgSqlErrorCode::ERRCODE_INVALID_CURSOR_NAME
        );
        assert_eq!(
            code(SpiError::SpiError(SpiErrorCodes::RelNotFound)),
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
        );
        assert_eq!(
            code(SpiError::SpiError(SpiErrorCodes::Connect)),
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
        );
    }
}
