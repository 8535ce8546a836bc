use super::*;
use crate::ledger::consensus::Decoded;
use crate::ledger::UpdateDraft;
use crate::network::Identity;
use proptest::prelude::*;

fn validators(n: u8) -> Vec<GenesisValidator> {
    (1..=n)
        .map(|i| GenesisValidator {
            peer_id: Identity::from_seed([i; 32]).peer_id(),
            power: u64::from(i),
        })
        .collect()
}

fn block_with_update() -> Block {
    let author = Identity::from_seed([42; 32]);
    let record = UpdateRecord::sign(
        &author,
        UpdateDraft {
            base: ModelId([1; 32]),
            adapter: ModelId([2; 32]),
            adapter_size: 10,
            parent: None,
            metrics: vec![],
        },
    )
    .unwrap();
    let mut draft = BlockDraft::default();
    draft.active.insert(record.base, record.adapter);
    draft.updates.push(record);
    Block::build(3, BlockHash([5; 32]), author.peer_id(), draft).unwrap()
}

#[test]
fn genesis_rules() {
    let g = Genesis::new("m", validators(3)).unwrap();
    assert_eq!(g.total_power(), 6);
    assert_eq!(g.power_of(&validators(3)[1].peer_id), 2);
    assert_eq!(g.power_of(&Identity::from_seed([9; 32]).peer_id()), 0);
    assert_eq!(Genesis::from_json(&g.to_json()).unwrap(), g);
    assert_eq!(Genesis::from_json(&g.to_json()).unwrap().hash(), g.hash());
    let mut twice = validators(2);
    twice.push(twice[0].clone());
    assert!(Genesis::new("m", twice).is_err());
    let mut zero = validators(2);
    zero[0].power = 0;
    assert!(Genesis::new("m", zero).is_err());
    assert!(Genesis::new("m", vec![]).is_err());
    assert!(Genesis::new("", validators(1)).is_err());
    // A peer id that hashes its key (as RSA ids do) carries no key to check votes with.
    let hashed = PeerId::random();
    let bad = vec![GenesisValidator {
        peer_id: hashed,
        power: 1,
    }];
    assert!(Genesis::new("m", bad).is_err());
    assert!(Genesis::from_json("{\"chain_id\": \"m\"}").is_err());
    // Another name, another chain.
    assert_ne!(Genesis::new("n", validators(3)).unwrap().hash(), g.hash());
}

#[test]
fn quorum_is_more_than_two_thirds() {
    assert!(has_quorum(3, 4));
    assert!(!has_quorum(2, 3));
    assert!(has_quorum(3, 3));
    assert!(!has_quorum(0, 1));
    assert!(has_quorum(MAX_POWER * 200, MAX_POWER * 256));
}

#[test]
fn blocks_round_trip_and_the_adapter_rule_holds() {
    let b = block_with_update();
    let again = Block::decode(b.encoded()).unwrap();
    assert_eq!(again.hash(), b.hash());
    assert_eq!(again.active, b.active);
    assert_eq!(again.updates[0].id(), b.updates[0].id());
    // An active adapter that is not the block's update for that base.
    let mut msg = BlockMsg::decode(b.encoded().as_ref()).unwrap();
    msg.active[0].adapter = vec![3; 32];
    assert!(Block::decode(&msg.encode_to_vec()).is_err());
    // The same update twice.
    let mut msg = BlockMsg::decode(b.encoded().as_ref()).unwrap();
    msg.updates.push(msg.updates[0].clone());
    assert!(Block::decode(&msg.encode_to_vec()).is_err());
    // A record whose signature no longer matches.
    let mut msg = BlockMsg::decode(b.encoded().as_ref()).unwrap();
    let n = msg.updates[0].len();
    msg.updates[0][n - 1] ^= 1;
    assert!(Block::decode(&msg.encode_to_vec()).is_err());
}

fn record(seed: u8, base: u8) -> UpdateRecord {
    UpdateRecord::sign(
        &Identity::from_seed([seed; 32]),
        UpdateDraft {
            base: ModelId([base; 32]),
            adapter: ModelId([seed; 32]),
            adapter_size: 10,
            parent: None,
            metrics: vec![],
        },
    )
    .unwrap()
}

#[test]
fn several_updates_of_a_model_need_their_aggregate() {
    let author = Identity::from_seed([1; 32]).peer_id();
    let build = |updates: Vec<UpdateRecord>, active: &[(u8, u8)], aggs: &[(u8, u8, u32)]| {
        let draft = BlockDraft {
            updates,
            active: active
                .iter()
                .map(|(b, a)| (ModelId([*b; 32]), ModelId([*a; 32])))
                .collect(),
            aggregates: aggs
                .iter()
                .map(|(b, a, f)| {
                    let entry = AggregateEntry {
                        adapter: ModelId([*a; 32]),
                        adapter_size: 99,
                        byzantine: *f,
                    };
                    (ModelId([*b; 32]), entry)
                })
                .collect(),
            stake: vec![],
        };
        Block::build(1, BlockHash([0; 32]), author, draft)
    };
    let three = || vec![record(10, 1), record(11, 1), record(12, 1)];
    // Three updates of model 1, their aggregate active.
    let b = build(three(), &[(1, 50)], &[(1, 50, 0)]).unwrap();
    let again = Block::decode(b.encoded()).unwrap();
    assert_eq!(again.aggregates, b.aggregates);
    assert_eq!(again.active[&ModelId([1; 32])], ModelId([50; 32]));
    // Without the aggregate, or activating one of the inputs instead.
    assert!(build(three(), &[(1, 10)], &[]).is_err());
    assert!(build(three(), &[(1, 10)], &[(1, 50, 0)]).is_err());
    // Multi-Krum needs n >= 2f + 3: 3 updates tolerate none.
    assert!(build(three(), &[(1, 50)], &[(1, 50, 1)]).is_err());
    let five = || (10..15).map(|s| record(s, 1)).collect::<Vec<_>>();
    assert!(build(five(), &[(1, 50)], &[(1, 50, 1)]).is_ok());
    // ... and no other choice: 5 updates tolerate exactly 1.
    assert!(build(five(), &[(1, 50)], &[(1, 50, 0)]).is_err());
    // An aggregate of one update, or of a model the block does not activate.
    assert!(build(vec![record(10, 1)], &[(1, 10)], &[(1, 50, 0)]).is_err());
    assert!(build(three(), &[(1, 50)], &[(1, 50, 0), (2, 51, 0)]).is_err());
    assert_eq!(byzantine_for(2), 0);
    assert_eq!(byzantine_for(4), 0);
    assert_eq!(byzantine_for(5), 1);
    assert_eq!(byzantine_for(8), 2);
}

proptest! {
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Block::decode(&bytes);
        let _ = Certificate::decode(&bytes);
        let _ = Decoded::decode(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = Genesis::from_json(text);
        }
        if let Ok(c) = Certificate::decode(&bytes) {
            let g = Genesis::new("m", validators(4)).unwrap();
            prop_assert!(c.verify(&Stakes::genesis(&g)).is_err());
        }
    }

    #[test]
    fn a_changed_byte_changes_the_block_or_breaks_it(i in any::<prop::sample::Index>(), bit in 0u8..8) {
        let b = block_with_update();
        let mut bytes = b.encoded().to_vec();
        let at = i.index(bytes.len());
        bytes[at] ^= 1 << bit;
        if let Ok(other) = Block::decode(&bytes) {
            prop_assert_ne!(other.hash(), b.hash());
        }
    }
}
