//! STUN Binding answers (placeholder; being written).
