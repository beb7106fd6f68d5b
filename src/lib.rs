//! sigrouter
