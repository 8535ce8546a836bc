//! In-memory network (under construction).
