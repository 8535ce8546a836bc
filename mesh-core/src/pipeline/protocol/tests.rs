//! Unit tests of the stage protocol's decoder and row codec.
use super::*;
use proptest::prelude::*;

fn forward(n_tokens: u32, dtype: DType) -> Vec<u8> {
    StageRequest {
        version: STAGE_VERSION,
        op: Some(StageOp::Forward(ForwardMsg {
            session: 7,
            pos: 3,
            n_tokens,
            dtype: dtype as i32,
            ..ForwardMsg::default()
        })),
    }
    .encode_to_vec()
}

#[test]
fn forward_round_trips_f32_and_f16() {
    let rows = vec![1.0f32, -2.5, 0.125, 65504.0];
    for dtype in [DType::F32, DType::F16] {
        let tensor = encode_rows(&rows, dtype);
        let call = decode_request(&forward(2, dtype), &tensor).unwrap();
        assert_eq!(
            call,
            StageCall::Forward {
                session: 7,
                pos: 3,
                n_tokens: 2,
                dtype,
                rows: rows.clone(),
                push: None,
            }
        );
    }
}

#[test]
fn pushed_forwards_decode_with_their_route_and_carried_rows() {
    let a = crate::network::Identity::from_seed([1; 32]).peer_id();
    let b = crate::network::Identity::from_seed([2; 32]).peer_id();
    let msg = |f: ForwardMsg| {
        StageRequest {
            version: STAGE_VERSION,
            op: Some(StageOp::Forward(f)),
        }
        .encode_to_vec()
    };
    let base = ForwardMsg {
        session: 7,
        pos: 3,
        n_tokens: 1,
        dtype: DType::F32 as i32,
        deliver: 9,
        timeout_ms: 1500,
        ..ForwardMsg::default()
    };
    let rows = |n: usize| encode_rows(&(0..n).map(|i| i as f32).collect::<Vec<_>>(), DType::F32);
    // From a stage: two carried chunks (the last is the input) and two
    // compute times.
    let relayed = ForwardMsg {
        route: vec![RouteHop {
            peer: b.to_bytes(),
            session: 11,
        }],
        origin: a.to_bytes(),
        carried: 1,
        compute_us: vec![4, 5],
        ..base.clone()
    };
    let tensor = rows(8);
    match decode_request(&msg(relayed.clone()), &tensor).unwrap() {
        StageCall::Forward {
            rows: input,
            push: Some(push),
            ..
        } => {
            assert_eq!(input, vec![4.0, 5.0, 6.0, 7.0]);
            assert_eq!(push.route, vec![(b, 11)]);
            assert_eq!(push.origin, Some(a));
            assert_eq!(&push.carried[..], &tensor[..]);
            assert_eq!(push.compute_us, vec![4, 5]);
            assert_eq!(push.timeout, Duration::from_millis(1500));
        }
        other => panic!("{other:?}"),
    }
    // From the client: its rows only, nothing carried.
    match decode_request(&msg(base.clone()), &rows(4)).unwrap() {
        StageCall::Forward {
            push: Some(push), ..
        } => assert!(push.carried.is_empty() && push.origin.is_none()),
        other => panic!("{other:?}"),
    }
    let refused = |f: ForwardMsg, t: &[u8]| decode_request(&msg(f), t).unwrap_err().code;
    // Rows that do not split into carried + 1 chunks.
    assert_eq!(refused(relayed.clone(), &rows(7)), ErrorCode::BadShape);
    // Carried rows or compute times without a delivery id or origin.
    let stray = ForwardMsg {
        deliver: 0,
        ..relayed.clone()
    };
    assert_eq!(refused(stray, &tensor), ErrorCode::Malformed);
    let no_origin = ForwardMsg {
        origin: Vec::new(),
        ..relayed.clone()
    };
    assert_eq!(refused(no_origin, &tensor), ErrorCode::Malformed);
    let long = ForwardMsg {
        route: vec![RouteHop::default(); MAX_ROUTE + 1],
        ..base.clone()
    };
    assert_eq!(refused(long, &rows(4)), ErrorCode::TooLarge);
    let bad_origin = ForwardMsg {
        origin: vec![0; 5],
        ..relayed
    };
    assert_eq!(refused(bad_origin, &tensor), ErrorCode::Malformed);
}

#[test]
fn bad_requests_get_typed_refusals() {
    let code = |meta: &[u8], tensor: &[u8]| decode_request(meta, tensor).unwrap_err().code;
    assert_eq!(code(b"\xff\xff", b""), ErrorCode::Malformed);
    let v2 = StageRequest {
        version: 2,
        op: None,
    }
    .encode_to_vec();
    assert_eq!(code(&v2, b""), ErrorCode::UnsupportedVersion);
    let none = StageRequest {
        version: STAGE_VERSION,
        op: None,
    }
    .encode_to_vec();
    assert_eq!(code(&none, b""), ErrorCode::Malformed);
    // 3 bytes are not 2 rows of f32.
    assert_eq!(code(&forward(2, DType::F32), b"abc"), ErrorCode::BadShape);
    assert_eq!(code(&forward(0, DType::F32), b""), ErrorCode::TooLarge);
    assert_eq!(
        code(&forward(MAX_BATCH_TOKENS + 1, DType::F32), &[0; 8]),
        ErrorCode::TooLarge
    );
    let open = |start, end, n_ctx, model: Vec<u8>| {
        StageRequest {
            version: STAGE_VERSION,
            op: Some(StageOp::Open(OpenMsg {
                model,
                layer_start: start,
                layer_end: end,
                n_ctx,
                exact: false,
                adapters: Vec::new(),
            })),
        }
        .encode_to_vec()
    };
    let with_adapters = |adapters: Vec<AdapterRef>| {
        StageRequest {
            version: STAGE_VERSION,
            op: Some(StageOp::Open(OpenMsg {
                model: vec![0; 32],
                layer_start: 0,
                layer_end: 3,
                n_ctx: 8,
                exact: false,
                adapters,
            })),
        }
        .encode_to_vec()
    };
    let adapter = |id: Vec<u8>, scale: f32| AdapterRef { id, scale };
    assert_eq!(
        code(&with_adapters(vec![adapter(vec![1; 31], 1.0)]), b""),
        ErrorCode::Malformed
    );
    assert_eq!(
        code(&with_adapters(vec![adapter(vec![1; 32], f32::NAN)]), b""),
        ErrorCode::Malformed
    );
    assert_eq!(
        code(
            &with_adapters(vec![adapter(vec![1; 32], 1.0); MAX_SESSION_ADAPTERS + 1]),
            b""
        ),
        ErrorCode::TooLarge
    );
    match decode_request(
        &with_adapters(vec![adapter(vec![1; 32], 0.5), adapter(vec![2; 32], -1.0)]),
        b"",
    ) {
        Ok(StageCall::Open { adapters, .. }) => assert_eq!(
            adapters,
            vec![(ModelId([1; 32]), 0.5), (ModelId([2; 32]), -1.0)]
        ),
        other => panic!("decoded {other:?}"),
    }
    assert_eq!(code(&open(3, 3, 8, vec![0; 32]), b""), ErrorCode::Malformed);
    assert_eq!(code(&open(0, 3, 8, vec![0; 31]), b""), ErrorCode::Malformed);
    assert_eq!(code(&open(0, 3, 0, vec![0; 32]), b""), ErrorCode::TooLarge);
    assert_eq!(
        code(&open(0, 3, MAX_SESSION_CTX + 1, vec![0; 32]), b""),
        ErrorCode::TooLarge
    );
    assert_eq!(
        code(&open(0, 3, 8, vec![0; 32]), b"x"),
        ErrorCode::Malformed
    );
}

proptest! {
    #[test]
    fn decoder_never_panics(meta in proptest::collection::vec(any::<u8>(), 0..64),
                            tensor in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_request(&meta, &tensor);
    }

    #[test]
    fn forward_rows_round_trip(rows in proptest::collection::vec(-1e4f32..1e4, 1..32)) {
        let n = rows.len() as u32;
        let call = decode_request(&forward(n, DType::F32), &encode_rows(&rows, DType::F32)).unwrap();
        match call {
            StageCall::Forward { rows: got, .. } => prop_assert_eq!(got, rows),
            other => prop_assert!(false, "decoded {:?}", other),
        }
    }
}
