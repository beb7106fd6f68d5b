//! Fixtures live in examples/.
