//! `sigrouter client …` commands (placeholder; being written).
