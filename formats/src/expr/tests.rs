//! Tests of the expression engine.
