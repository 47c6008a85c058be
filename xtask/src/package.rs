//! `cargo xtask package`: the Debian package of the agent, then its checks.
//!
//! The .deb is assembled with `dpkg-deb --build` from a staged tree rather than with
//! cargo-deb: every file, maintainer script and control field is in this file or under
//! `packaging/`, nothing is downloaded or compiled for it, and the checks below see
//! exactly what dpkg-deb was given. The maintainer scripts are debhelper's snippets for
//! one systemd unit, written out (`packaging/debian/`).
//!
//! Checks, each fatal: lintian (no errors), the example configurations parse and the
//! Elasticsearch template maps every field of real events, the DaemonSet asks for the
//! unit's capabilities, and the package installs, enables its unit, passes
//! `systemd-analyze verify` and purges cleanly in a throwaway copy of this machine.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{agent_binary, status, step, workspace_root};

const PACKAGE: &str = "portwatch";
const MAINTAINER: &str = "portwatch developers <portwatch@example.invalid>";
const UNIT_DIR: &str = "usr/lib/systemd/system";
/// The capabilities of `packaging/systemd/portwatch.service`, also asked for by the
/// DaemonSet (which adds SYS_RESOURCE: no systemd there to raise RLIMIT_MEMLOCK).
const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "NET_RAW",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];

/// The DaemonSet's seccomp profile (under packaging/), derived from the unit.
const SECCOMP_PROFILE: &str = "k8s/seccomp-portwatch.json";

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Only build the .deb; skip lintian and the install check.
    #[arg(long)]
    pub no_check: bool,
    /// Also boot this machine's userland under systemd-nspawn (systemd as PID 1), install
    /// the .deb there and check the running service (needs systemd-container).
    #[arg(long)]
    pub boot: bool,
    /// Rewrite packaging/k8s/seccomp-portwatch.json from the unit's SystemCallFilter=
    /// (the checks fail while the committed profile differs).
    #[arg(long)]
    pub write_seccomp: bool,
}

pub fn run(args: &PackageArgs) -> anyhow::Result<()> {
    if args.write_seccomp {
        let unit = fs::read_to_string(packaging().join("systemd/portwatch.service"))?;
        let profile = crate::seccomp::profile(&unit)?;
        fs::write(
            packaging().join(SECCOMP_PROFILE),
            serde_json::to_string_pretty(&profile)? + "\n",
        )?;
        step(&format!("wrote packaging/{SECCOMP_PROFILE}"));
    }
    let deb = build_deb()?;
    if !args.no_check {
        check(&deb)?;
    }
    if args.boot {
        boot_check(&deb)?;
    }
    println!("{}", deb.display());
    Ok(())
}

fn packaging() -> PathBuf {
    workspace_root().join("packaging")
}

fn out_dir() -> PathBuf {
    workspace_root().join("target/package")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Copies `src` to `root/dest` with `mode`, creating the directories on the way.
fn install(src: &Path, root: &Path, dest: &str, mode: u32) -> anyhow::Result<()> {
    let to = root.join(dest);
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, &to).with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(root: &Path, dest: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let to = root.join(dest);
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&to, contents).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `gzip -9n` (no name, no timestamp), as Debian policy asks for man pages and changelogs.
fn gzip(root: &Path, dest: &str) -> anyhow::Result<()> {
    status(Command::new("gzip").args(["-9nf"]).arg(root.join(dest)))
}

fn build_deb() -> anyhow::Result<PathBuf> {
    let t = Instant::now();
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let out = out_dir();
    let root = out.join("root");
    let generated = out.join("generated");
    for dir in [&root, &generated] {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
    }
    fs::create_dir_all(&root)?;
    step(&format!("packaging {PACKAGE} {version} ({arch})"));

    // The agent, stripped as dh_strip does (release builds keep the symbol table).
    install(&agent_binary(), &root, "usr/sbin/portwatch", 0o755)?;
    status(
        Command::new("strip")
            .args([
                "--remove-section=.comment",
                "--remove-section=.note",
                "--strip-unneeded",
            ])
            .arg(root.join("usr/sbin/portwatch")),
    )?;

    // Man pages and completions, rendered by the binary from its own clap tree.
    status(Command::new(agent_binary()).arg("generate").arg(&generated))?;
    for entry in fs::read_dir(generated.join("man"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let dest = format!("usr/share/man/man8/{name}");
        install(&entry.path(), &root, &dest, 0o644)?;
        gzip(&root, &dest)?;
    }
    let completions = generated.join("completions");
    for (file, dest) in [
        (
            "portwatch.bash",
            "usr/share/bash-completion/completions/portwatch",
        ),
        ("_portwatch", "usr/share/zsh/vendor-completions/_portwatch"),
        (
            "portwatch.fish",
            "usr/share/fish/vendor_completions.d/portwatch.fish",
        ),
    ] {
        install(&completions.join(file), &root, dest, 0o644)?;
    }

    let pkg = packaging();
    let unit = format!("{UNIT_DIR}/portwatch.service");
    install(&pkg.join("systemd/portwatch.service"), &root, &unit, 0o644)?;
    install(
        &pkg.join("debian/default"),
        &root,
        "etc/default/portwatch",
        0o644,
    )?;
    install(
        &pkg.join("debian/logrotate"),
        &root,
        "etc/logrotate.d/portwatch",
        0o644,
    )?;

    let doc = "usr/share/doc/portwatch";
    install(
        &pkg.join("debian/copyright"),
        &root,
        &format!("{doc}/copyright"),
        0o644,
    )?;
    let date = output(
        Command::new("git")
            .args(["log", "-1", "--format=%cD"])
            .current_dir(workspace_root()),
    )
    .unwrap_or_else(|_| output(Command::new("date").arg("-R")).unwrap_or_default());
    let changelog = fs::read_to_string(pkg.join("debian/changelog"))?
        .replace("@VERSION@", &version)
        .replace("@MAINTAINER@", MAINTAINER)
        .replace("@DATE@", &date);
    write(
        &root,
        &format!("{doc}/changelog.Debian"),
        changelog.as_bytes(),
        0o644,
    )?;
    gzip(&root, &format!("{doc}/changelog.Debian"))?;
    for (src, name) in [
        ("ingest/vector.toml", "vector.toml"),
        ("ingest/fluent-bit.yaml", "fluent-bit.yaml"),
        (
            "elasticsearch/index-template.json",
            "elasticsearch-index-template.json",
        ),
    ] {
        install(
            &pkg.join(src),
            &root,
            &format!("{doc}/examples/{name}"),
            0o644,
        )?;
    }

    // Control area.
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &pkg.join("debian").join(script),
            &root,
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    write(
        &root,
        "DEBIAN/conffiles",
        b"/etc/default/portwatch\n/etc/logrotate.d/portwatch\n",
        0o644,
    )?;
    let depends = shlib_depends(&root.join("usr/sbin/portwatch"))?;
    let control = format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {size}\n\
         Depends: {depends}\n\
         Suggests: logrotate\n\
         Section: admin\n\
         Priority: optional\n\
         Description: eBPF sensor that reports every TCP listener and UDP bind\n \
         portwatch watches every listen() and UDP bind() on the host from the\n \
         kernel, including listeners that live for milliseconds, and reports each\n \
         one attributed to its process, user, systemd unit and container, with\n \
         its exposure and a risk verdict for well-known dangerous ports, as ECS\n \
         JSON lines for a SIEM.\n \
         .\n \
         The portwatch service writes /var/log/portwatch/events.json with a\n \
         reduced set of capabilities; examples for Vector, Fluent Bit and an\n \
         Elasticsearch index template are in /usr/share/doc/portwatch/examples.\n",
        size = installed_size_kib(&root)?,
    );
    write(&root, "DEBIAN/control", control.as_bytes(), 0o644)?;
    md5sums(&root)?;

    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    set_dir_modes(&root)?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let mut build = Command::new("dpkg-deb");
    build
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb);
    // Clamp file times to the last commit, for a reproducible .deb.
    if let Ok(epoch) = output(
        Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(workspace_root()),
    ) {
        build.env("SOURCE_DATE_EPOCH", epoch);
    }
    output(&mut build)?;
    step(&format!(
        "built {} in {:.1} s",
        deb.strip_prefix(workspace_root()).unwrap_or(&deb).display(),
        t.elapsed().as_secs_f64()
    ));
    Ok(deb)
}

/// `Depends:` from the libraries the binary links, as dpkg-shlibdeps computes them (it
/// wants a debian/control to read, so it gets a minimal one in a scratch directory).
fn shlib_depends(binary: &Path) -> anyhow::Result<String> {
    let scratch = out_dir().join("shlibdeps");
    fs::create_dir_all(scratch.join("debian"))?;
    fs::write(
        scratch.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let line = output(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "--warnings=0"])
            .arg(binary)
            .current_dir(&scratch),
    )?;
    let depends = line
        .strip_prefix("shlibs:Depends=")
        .with_context(|| format!("unexpected dpkg-shlibdeps output: {line}"))?;
    Ok(depends.to_owned())
}

/// What dpkg-gencontrol puts in Installed-Size: KiB per file, rounded up, and one per
/// directory.
fn installed_size_kib(root: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for path in walk(root)? {
        if path.starts_with(root.join("DEBIAN")) {
            continue;
        }
        let meta = fs::symlink_metadata(&path)?;
        total += if meta.is_file() {
            meta.len().div_ceil(1024)
        } else {
            1
        };
    }
    Ok(total)
}

fn md5sums(root: &Path) -> anyhow::Result<()> {
    let files: Vec<String> = walk(root)?
        .into_iter()
        .filter(|p| p.is_file() && !p.starts_with(root.join("DEBIAN")))
        .map(|p| {
            p.strip_prefix(root)
                .map(|r| r.to_string_lossy().into_owned())
        })
        .collect::<Result<_, _>>()?;
    let sums = output(Command::new("md5sum").args(&files).current_dir(root))?;
    write(
        root,
        "DEBIAN/md5sums",
        format!("{sums}\n").as_bytes(),
        0o644,
    )
}

/// Every path under `root` (not `root` itself), sorted.
fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Directories 0755 whatever the umask of whoever runs this.
fn set_dir_modes(root: &Path) -> anyhow::Result<()> {
    for path in walk(root)? {
        if path.is_dir() && !path.is_symlink() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

fn check(deb: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    step("lintian (errors fail the check)");
    let st = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb)
        .status()
        .context("running lintian (apt-get install lintian, or `cargo xtask setup`)")?;
    if !st.success() {
        bail!("lintian reports errors for {}", deb.display());
    }

    step("example configurations: parse, and the index template maps every field");
    check_examples()?;

    step("install into a throwaway copy of this machine (overlay on /, private mounts)");
    let scratch = out_dir().join("throwaway-root");
    fs::create_dir_all(&scratch)?;
    let script = out_dir().join("package-install-check.sh");
    fs::write(&script, include_str!("package-install-check.sh"))?;
    status(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh"])
            .arg(&script)
            .arg(deb)
            .arg(&scratch),
    )?;
    step(&format!(
        "package checks done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// dpkg -i, then the service under a real systemd: `package-boot-check.sh`.
fn boot_check(deb: &Path) -> anyhow::Result<()> {
    let t = Instant::now();
    step("boot this machine's userland with systemd as PID 1 (nspawn), install, run, purge");
    let scratch = out_dir().join("boot-root");
    fs::create_dir_all(&scratch)?;
    let script = out_dir().join("package-boot-check.sh");
    fs::write(&script, include_str!("package-boot-check.sh"))?;
    status(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh"])
            .arg(&script)
            .arg(deb)
            .arg(&scratch),
    )
    .context("the package's service under systemd (is systemd-container installed?)")?;
    step(&format!(
        "boot check done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn check_examples() -> anyhow::Result<()> {
    let pkg = packaging();
    let read =
        |p: &str| fs::read_to_string(pkg.join(p)).with_context(|| format!("reading packaging/{p}"));
    let vector: toml::Table = read("ingest/vector.toml")?
        .parse()
        .context("packaging/ingest/vector.toml is not valid TOML")?;
    if !vector.contains_key("sinks") {
        bail!("packaging/ingest/vector.toml has no sinks");
    }
    let template: Value = serde_json::from_str(&read("elasticsearch/index-template.json")?)
        .context("packaging/elasticsearch/index-template.json is not valid JSON")?;
    let mappings = &template["template"]["mappings"];
    let samples = read("elasticsearch/sample-events.json")?;
    let mut checked = BTreeSet::new();
    for (i, line) in samples.lines().enumerate() {
        let event: Value = serde_json::from_str(line)
            .with_context(|| format!("sample-events.json:{}: not JSON", i + 1))?;
        check_mapped(mappings, &event, "", &mut checked)
            .with_context(|| format!("sample-events.json:{}", i + 1))?;
    }
    println!(
        "  ok: index template maps all {} fields of {} sample events",
        checked.len(),
        samples.lines().count()
    );

    // YAML: Debian's python3-yaml (a set-up package), so no YAML crate for two files.
    let yaml = output(
        Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import json, sys, yaml\n\
                 print(json.dumps([list(yaml.safe_load_all(open(p))) for p in sys.argv[1:]]))",
            ])
            .arg(pkg.join("k8s/daemonset.yaml"))
            .arg(pkg.join("ingest/fluent-bit.yaml")),
    )
    .context("parsing the YAML examples (needs python3-yaml)")?;
    let docs: Value = serde_json::from_str(&yaml)?;
    check_daemonset(&docs[0])?;
    if docs[1][0]["pipeline"]["outputs"][0]["name"] != "es" {
        bail!("packaging/ingest/fluent-bit.yaml: the first output is not `es`");
    }
    println!("  ok: vector.toml, fluent-bit.yaml, daemonset.yaml parse");
    Ok(())
}

/// Every leaf of `event` has a mapping in `mappings` (or sits under a `flattened` field)
/// of a type its value can be indexed as.
fn check_mapped(
    mappings: &Value,
    event: &Value,
    prefix: &str,
    checked: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    let Some(fields) = event.as_object() else {
        return Ok(());
    };
    for (name, value) in fields {
        let path = format!("{prefix}{name}");
        let mapping = &mappings["properties"][name];
        if mapping.is_null() {
            bail!("field {path} has no mapping in the index template");
        }
        let values: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        if mapping["type"] == "flattened" {
            checked.insert(path);
            continue;
        }
        for v in values {
            if v.is_object() {
                check_mapped(mapping, v, &format!("{path}."), checked)?;
                continue;
            }
            let ty = mapping["type"].as_str().unwrap_or("object");
            let fits = match ty {
                "keyword" | "wildcard" | "match_only_text" | "text" | "constant_keyword" => {
                    v.is_string()
                }
                "long" | "unsigned_long" => v.is_u64() || v.is_i64(),
                "boolean" => v.is_boolean(),
                "ip" => v
                    .as_str()
                    .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
                "date" | "date_nanos" => v.as_str().is_some_and(|s| s.ends_with('Z')),
                _ => false,
            };
            if !fits {
                bail!("field {path}: value {v} does not fit its mapping type {ty}");
            }
            checked.insert(path.clone());
        }
    }
    Ok(())
}

/// The DaemonSet's pod runs in the host's PID and network namespaces, unprivileged, with
/// exactly the unit's capabilities plus SYS_RESOURCE.
fn check_daemonset(docs: &Value) -> anyhow::Result<()> {
    let ds = docs
        .as_array()
        .and_then(|d| d.iter().find(|d| d["kind"] == "DaemonSet"))
        .context("packaging/k8s/daemonset.yaml has no DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    if pod["hostPID"] != true || pod["hostNetwork"] != true {
        bail!("daemonset.yaml: the pod needs hostPID and hostNetwork");
    }
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    if sc["privileged"] != false {
        bail!("daemonset.yaml: the container must not be privileged");
    }
    // With CAP_SYS_ADMIN the kubelet treats allowPrivilegeEscalation as true whatever
    // it says: `false` would only look like a protection.
    if sc.get("allowPrivilegeEscalation").is_some() {
        bail!(
            "daemonset.yaml: allowPrivilegeEscalation means nothing with SYS_ADMIN; leave it out"
        );
    }
    if sc["seccompProfile"]["type"] != "Localhost"
        || sc["seccompProfile"]["localhostProfile"] != "portwatch.json"
    {
        bail!("daemonset.yaml: seccompProfile must be Localhost portwatch.json");
    }
    let probe = &container["livenessProbe"]["httpGet"];
    let args: Vec<&str> = container["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let metrics = args
        .iter()
        .position(|a| *a == "--metrics")
        .and_then(|i| args.get(i + 1))
        .copied();
    let probed = format!(
        "{}:{}",
        probe["host"].as_str().unwrap_or(""),
        probe["port"].as_u64().unwrap_or(0)
    );
    if probe["path"] != "/healthz" || metrics != Some(probed.as_str()) {
        bail!(
            "daemonset.yaml: the liveness probe ({probed}{}) must GET /healthz on the \
             --metrics address ({metrics:?})",
            probe["path"]
        );
    }
    let unit_text = fs::read_to_string(packaging().join("systemd/portwatch.service"))?;
    let want = crate::seccomp::profile(&unit_text)?;
    let have: Value = serde_json::from_str(
        &fs::read_to_string(packaging().join(SECCOMP_PROFILE))
            .with_context(|| format!("reading packaging/{SECCOMP_PROFILE}"))?,
    )
    .with_context(|| format!("packaging/{SECCOMP_PROFILE} is not JSON"))?;
    if have != want {
        bail!(
            "packaging/{SECCOMP_PROFILE} differs from the unit's SystemCallFilter= \
             (run cargo xtask package --write-seccomp)"
        );
    }
    let added: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut want: BTreeSet<&str> = CAPABILITIES.iter().copied().collect();
    want.insert("SYS_RESOURCE");
    if added != want {
        bail!("daemonset.yaml adds capabilities {added:?}, expected {want:?}");
    }
    let unit = fs::read_to_string(packaging().join("systemd/portwatch.service"))?;
    let bounding: BTreeSet<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|c| c.strip_prefix("CAP_"))
                .collect()
        })
        .unwrap_or_default();
    let want: BTreeSet<&str> = CAPABILITIES.iter().copied().collect();
    if bounding != want {
        bail!("portwatch.service CapabilityBoundingSet {bounding:?}, expected {want:?}");
    }
    Ok(())
}
