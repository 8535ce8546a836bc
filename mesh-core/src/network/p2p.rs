//! libp2p network (under construction).
