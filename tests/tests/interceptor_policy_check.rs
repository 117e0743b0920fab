//! `hoshino-agent policy check FILE`: exit 0 with the compiled rules, or exit 2 with
//! `FILE:LINE:COL: what was expected`. Needs no privileges.

mod interceptor_support;

use std::process::Command;

use hoshino_tests::binaries;
use hoshino_tests::scratch::ScratchDir;
use interceptor_support::example_policy;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(binaries::agent().expect("hoshino-agent binary"))
        .args(["policy", "check"])
        .arg(path)
        .output()
        .expect("run policy check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn examples_check_and_print_their_rules() {
    for (name, rule) in [
        ("metadata.toml", "imds-users"),
        ("ula-tunnel.toml", "hoshino-network"),
        ("prefixes-1000.toml", "block-9"),
    ] {
        let (code, stdout, stderr) = check(&example_policy(name));
        assert_eq!(code, 0, "{name}: {stderr}");
        assert!(stdout.contains(rule), "{name}:\n{stdout}");
        assert!(stdout.contains("otherwise pass"), "{name}:\n{stdout}");
    }
}

#[test]
fn invalid_policies_exit_2_with_file_line_col() {
    let dir = ScratchDir::create("policy-check").expect("scratch");
    let cases = [
        (
            "[[rule]]\nname = \"a\"\naction = \"tunel\"\n",
            "3:10: unknown verdict `tunel`, expected one of pass, drop, tunnel, divert",
        ),
        (
            "[[rule]]\nname = \"a\"\ndst = [\"10.0.0.300/8\"]\naction = \"drop\"\n",
            "3:8: bad prefix",
        ),
        (
            "[[rule]]\nname = \"a\"\nprotocol = \"tcp\"\ndport = 70000\naction = \"drop\"\n",
            "4:9: port 70000 is out of range",
        ),
        (
            "[[rule]]\nname = \"a\"\naction = \"drop\"\n[[rule]]\nname = \"a\"\naction = \"pass\"\n",
            "5:8: duplicate rule name `a`",
        ),
        (
            "[[rule]]\nname = \"a\"\nport = 80\naction = \"drop\"\n",
            "3:1: unknown field `port`",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).expect("write policy");
        let (code, _, stderr) = check(&path);
        assert_eq!(code, 2, "{text}\n{stderr}");
        let want = format!("{}:{expected}", path.display());
        assert!(
            stderr.starts_with(&want),
            "expected `{want}`, got:\n{stderr}"
        );
    }
    let (code, _, stderr) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot read policy file"), "{stderr}");
}
