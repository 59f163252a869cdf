"""The Debian 12 recipe end to end on a loop device: every phase, and verify and the qemu boot check
catching deliberately broken images (root, slow: one debootstrap per session, ~2 min here, warm cache).

The image is built without its boot check: the green night (tests/e2e/test_green_night.py) builds
an image of the same recipe and definition through the DAG, boots it on the box and checks every
item of that boot, so a second boot of a good image here would prove nothing more. The boots here
are of broken copies, each failing the item that names its breakage.

The image is built with the rehearsal's customized definition (rehearsal/images.py): a package from a
real signed apt repository behind basic auth on 127.0.0.1 (rehearsal/aptrepo.py), its credentials
handed over on stdin (``build-image credentials``), a file, a provisioning script, a service and a
kernel argument, each checked in the image and by a smoke check on the booted image; and the password
is nowhere afterwards (image files, raw canvas bytes, phase logs).

Packages come from the mirror this machine's apt sources use. The offline package cache
(``rehearsal.sshd.package_cache``) keeps downloaded .debs between runs; the production path never
sets it.
"""

from __future__ import annotations

import os
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from loopdisk import BuildResult, LoopVolume, run_build

from operators.rules import definition, manifest
from rehearsal import images
from rehearsal.aptrepo import AptRepo
from rehearsal.sshd import package_cache, package_cache_env

#: One worker builds the image once for all of them (./run-tests: --dist loadgroup).
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.xdist_group("debian12-image")]

ALL_PHASES = ["tools", "resolve", "partition", "mkfs", "mount", "bootstrap", "configure", "packages", "files",
              "provision", "bootloader", "relabel", "clean", "verify"]
REPO_USER, REPO_PASSWORD = "rehearsal", "Deb12-Repo-Secret-7c41e9"
BUILD_ID = "0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, AptRepo]]:
    """The customized definition's bundle (as the worker ships it) and its served repository."""
    work = tmp_path_factory.mktemp("definition")
    with AptRepo.serve(work / "repo", user=REPO_USER, password=REPO_PASSWORD) as repo:
        image = definition.load(images.write_definition(work / "images", repo))
        definition.render_bundle(image, work / "image")
        yield work / "image", repo


@pytest.fixture(scope="module")
def built(bundle: tuple[Path, AptRepo]) -> Iterator[tuple[LoopVolume, BuildResult]]:
    """One Debian 12 image of the customized definition, built with `all --no-boot-check` on 3 GiB."""
    image_dir, _ = bundle
    vol = LoopVolume(size_gib=3)
    options = ["--image-dir", str(image_dir), "--build-id", BUILD_ID]
    try:
        line = f"{images.REPO_NAME}\t{REPO_USER}\t{REPO_PASSWORD}\n"
        handed = run_build(vol, *options, "credentials", stdin=line)
        assert handed.rc == 0, handed.stderr
        res = run_build(vol, *options, "--no-boot-check", "all", env=package_cache_env(package_cache()),
                        timeout=2400)
        yield vol, res
    finally:
        vol.teardown()


def root_uuid(vol: LoopVolume) -> str:
    """UUID of the canvas root filesystem, read from the disk."""
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", vol.partition(2)],
                          capture_output=True, text=True, check=True).stdout.strip()


def verify(vol: LoopVolume) -> BuildResult:
    """Run the verify phase alone, as a retry or an operator would."""
    return run_build(vol, "verify", timeout=300)


def mount_root(vol: LoopVolume) -> None:
    """Mount the canvas root again: a failed phase unmounts everything (a retry starts clean)."""
    res = run_build(vol, "mount")
    assert res.rc == 0, res.stderr


@contextmanager
def restored_bytes(dev: str, length: int) -> Iterator[None]:
    """Keep the first bytes of a block device and put them back afterwards."""
    with open(dev, "rb") as f:
        saved = f.read(length)
    try:
        yield
    finally:
        with open(dev, "r+b") as f:
            f.write(saved)


@contextmanager
def restored_file(vol: LoopVolume, rel: str) -> Iterator[Path]:
    """A file of the image, kept and put back afterwards (re-mounting the root to do so)."""
    mount_root(vol)
    path = vol.work / "root" / rel
    saved = path.read_bytes()
    try:
        yield path
    finally:
        mount_root(vol)
        path.write_bytes(saved)


def test_all_phases_pass(built) -> None:
    """`all` succeeds; only the root fs stays mounted, ready to be frozen."""
    vol, res = built
    assert res.rc == 0, res.stderr + "\n".join(res.other_stdout[-60:])
    assert res.phases("phase-start") == ALL_PHASES
    assert res.phases("phase-end") == ALL_PHASES
    assert res.result == {"event": "result", "status": "ok"}
    root = vol.work / "root"
    assert vol.mountpoints() == [str(root)]
    assert f" {root}/" not in Path("/proc/self/mountinfo").read_text(), "a bind mount was left"


#: What instance-check reports on a good Debian image booted without the definition's bundle (the
#: bootcheck phase alone): the green night's boot check passes each of them, SELinux not applicable.
RECIPE_ITEMS = ["cloud-init", "root-grew", "systemd-units", "hostname", "host-keys", "imdsv2-only",
                "time-daemon", "kernel-cmdline", "selinux-enforcing", "selinux-labels"]


def checks(res: BuildResult) -> dict[str, tuple[str, str]]:
    """item -> (status, detail) of the boot check's ``check`` events."""
    return {e["item"]: (e["status"], e["detail"]) for e in res.events if e.get("event") == "check"}


def test_image_contents(built) -> None:
    """grub.cfg and fstab by UUID, serial console, cleaned identity, no build leftovers."""
    vol, _ = built
    root = vol.work / "root"
    uuid = root_uuid(vol)
    cfg = (root / "boot/grub/grub.cfg").read_text()
    roots = {tok for line in cfg.splitlines() for tok in line.split() if tok.startswith("root=")}
    assert roots == {f"root=UUID={uuid}"}
    assert "console=ttyS0,115200n8" in cfg
    assert (root / "etc/fstab").read_text().splitlines()[1] == f"UUID={uuid} / xfs defaults,noatime 0 0"
    assert (root / "etc/machine-id").read_text() == ""
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert not (root / "etc/resolv.conf").exists()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert "GRUB_DEVICE" not in (root / "etc/default/grub").read_text()
    assert list((root / "boot/grub/i386-pc").glob("core.img"))
    sources = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "Suites: bookworm bookworm-updates" in sources
    mirror = sources.split("URIs: ")[1].split()[0]  # the security archive is the mirror's (contract.env)
    assert f"URIs: {mirror}-security\nSuites: bookworm-security\n" in sources
    cloud = yaml.safe_load((root / "etc/cloud/cloud.cfg.d/90-amibake.cfg").read_text())
    ec2_only = {"datasource_list": ["Ec2"], "datasource": {"Ec2": {"strict_id": True}}}
    assert cloud == {**ec2_only, "locale": "C.UTF-8"}
    assert images.KERNEL_ARG in cfg
    # compressed the way initramfs.conf says (zstd installed), not mkinitramfs's gzip fallback
    (initrd,) = (root / "boot").glob("initrd.img-*")
    assert "COMPRESS=zstd" in (root / "etc/initramfs-tools/initramfs.conf").read_text()
    assert initrd.read_bytes()[:4] == b"\x28\xb5\x2f\xfd", "the initramfs is not zstd-compressed"


def test_the_definition_is_in_the_image_and_its_password_nowhere(built, bundle) -> None:
    """The package from the private repository, the file with its mode and group, the script's marker
    (run inside the image with the AMIBAKE_* environment), the enabled unit, the repository source
    without any login; the password in no file, no raw byte of the canvas, no phase log."""
    vol, res = built
    assert res.rc == 0, res.stderr
    root = vol.work / "root"
    _, repo = bundle
    assert (root / "usr/share/amibake-hello/VERSION").read_text() == "1.0\n"
    motd = root / "etc/motd"
    assert motd.read_text() == images.MOTD and oct(motd.stat().st_mode & 0o7777) == "0o640"
    group = subprocess.run(["chroot", str(root), "stat", "-c", "%U:%G", "/etc/motd"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert group == "root:adm"
    marker = (root / images.MARKER.lstrip("/")).read_text()
    assert marker == f"image={images.NAME} recipe=debian12 build={BUILD_ID}\n"
    assert (root / "etc/systemd/system/multi-user.target.wants" / repo.unit).is_symlink()
    source = (root / f"etc/apt/sources.list.d/amibake-{images.REPO_NAME}.list").read_text()
    keyring = f"/usr/share/keyrings/amibake-{images.REPO_NAME}.gpg"
    assert source == f"deb [signed-by={keyring}] {repo.url} {repo.suite} {' '.join(repo.components)}\n"
    assert (root / keyring.lstrip("/")).is_file()
    assert list((root / "etc/apt/auth.conf.d").glob("amibake-*")) == [], "clean left the repository login"
    assert not (root / "var/tmp/amibake-stage").exists(), "the staged files and scripts were left"
    # the repository saw the build's requests, every one of them with the login
    assert repo.fetched("/InRelease") and all(ok for _, ok in repo.requests), repo.requests
    # the password: nowhere
    secret = REPO_PASSWORD.encode()
    hits = subprocess.run(["grep", "-rlsaF", "--devices=skip", REPO_PASSWORD, str(root)],
                          capture_output=True, text=True).stdout
    assert hits == "", hits
    subprocess.run(["blockdev", "--flushbufs", vol.device], check=True)  # XFS wrote past this cache
    tail = b""
    with open(vol.device, "rb") as disk:
        while chunk := disk.read(64 << 20):
            assert secret not in tail + chunk, "the password is in the canvas's raw bytes"
            tail = chunk[-len(secret) :]
    for log in (vol.work / "logs").glob("*.log"):
        assert secret not in log.read_bytes(), log
    assert REPO_PASSWORD not in res.stderr + "\n".join(res.other_stdout)
    assert not (vol.work / "run" / "credentials").exists(), "the box kept the credentials after the build"
    verify_log = (vol.work / "logs" / "verify.log").read_text()
    assert "no repository password in the image's files or raw bytes" in verify_log


def test_the_package_list_is_the_images_dpkg_database(built, bundle) -> None:
    """After verify the box wrote the image's package list and announced it once (path, count,
    sha256): the file is well-formed and canonical (the worker's parser takes it), has the announced
    digest, holds exactly the "ii" packages the image's own dpkg-query lists, with their full versions,
    among them the recipe's kernel and cloud-init and the definition's package from its repository."""
    vol, res = built
    assert res.rc == 0, res.stderr
    kinds = [e["event"] for e in res.events if e["event"] in ("expectations", "packages")]
    assert kinds == ["expectations", "packages"]
    (event,) = [e for e in res.events if e["event"] == "packages"]
    # (under this test's --work-dir: the worker takes only the box's default one, manifest.packages_event)
    path, count, digest = event["path"], event["count"], event["sha256"]
    assert path == str(vol.work / "run" / "packages.tsv")
    packages = manifest.parse_list(Path(path).read_bytes(), sha256=digest, count=count)
    dpkg = subprocess.run(
        ["chroot", str(vol.work / "root"), "dpkg-query", "-W",
         "-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    installed = {(n, a): v for s, n, v, a in (row.split("\t") for row in dpkg) if s.startswith("ii")}
    assert {p.key: p.evr for p in packages} == installed and len(packages) == len(installed)
    names = {p.name for p in packages}
    assert {"linux-image-cloud-amd64", "cloud-init", "grub-pc", "openssh-server", "amibake-hello"} <= names
    assert manifest.package("amibake-hello", 0, "1.0", "", "all") in packages  # a native package


def test_verify_passes_on_the_built_image(built) -> None:
    """verify alone re-derives device and mount point and passes; it lists the same packages again
    (the same file, count and digest: a retried build announces the same list)."""
    vol, first = built
    res = verify(vol)
    assert res.rc == 0, res.stderr
    assert [e for e in res.events if e["event"] == "packages"] == [
        e for e in first.events if e["event"] == "packages"
    ]
    log = (vol.work / "logs" / "verify.log").read_text()
    assert "initramfs" in log and "nvme xen-blkfront virtio_blk ena xen-netfront" in log


def test_verify_catches_root_on_a_loop_device(built) -> None:
    """grub.cfg with root=/dev/loopXp2 (what update-grub writes on loop devices) is caught."""
    vol, _ = built
    with restored_file(vol, "boot/grub/grub.cfg") as cfg:
        cfg.write_text(cfg.read_text().replace(f"root=UUID={root_uuid(vol)}", f"root={vol.partition(2)}"))
        res = verify(vol)
        assert res.rc != 0
        assert vol.mountpoints() == [], "a failed phase leaves nothing mounted"
        assert f"grub.cfg has 'root={vol.partition(2)}'" in res.stderr
        assert "phase verify failed" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_missing_boot_code(built) -> None:
    """A zeroed MBR boot code area (bootloader never installed) is caught."""
    vol, _ = built
    with restored_bytes(vol.device, 440):
        with open(vol.device, "r+b") as dev:
            dev.write(bytes(440))
        res = verify(vol)
        assert res.rc != 0
        assert f"no GRUB boot code in the MBR of {vol.device}" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_missing_core_image(built) -> None:
    """An empty bios_grub partition (core image not embedded) is caught."""
    vol, _ = built
    with restored_bytes(vol.partition(1), 1024 * 1024):
        with open(vol.partition(1), "r+b") as dev:
            dev.write(bytes(1024 * 1024))
        res = verify(vol)
        assert res.rc != 0
        assert "bios_grub partition" in res.stderr and "is empty" in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_an_unknown_fstab_uuid(built) -> None:
    """An fstab entry naming a UUID that is not on the canvas is caught."""
    vol, _ = built
    stranger = str(uuidlib.uuid4())
    with restored_file(vol, "etc/fstab") as fstab:
        fstab.write_text(fstab.read_text().replace(root_uuid(vol), stranger))
        res = verify(vol)
        assert res.rc != 0
        want = f"fstab entry for / names UUID={stranger}, which is not a filesystem on the canvas"
        assert want in res.stderr
    assert verify(vol).rc == 0


def test_verify_catches_a_missing_storage_driver(built) -> None:
    """The cloud kernel builds nvme in; without it (and not in the initramfs) verify fails."""
    vol, _ = built
    mount_root(vol)
    kver = next((vol.work / "root/lib/modules").iterdir()).name
    with restored_file(vol, f"lib/modules/{kver}/modules.builtin") as builtin:
        lines = builtin.read_text().splitlines()
        assert "kernel/drivers/nvme/host/nvme.ko" in lines, "nvme is expected built into this kernel"
        builtin.write_text("".join(f"{x}\n" for x in lines if not x.endswith("/nvme.ko")))
        res = verify(vol)
        assert res.rc != 0
        assert f"of kernel {kver} lacks driver nvme" in res.stderr
    assert verify(vol).rc == 0


def test_bootcheck_fails_an_unbootable_disk(built) -> None:
    """No boot code: the boot check fails naming the boot, and no qemu is left running."""
    vol, _ = built
    with restored_bytes(vol.device, 440):
        with open(vol.device, "r+b") as dev:
            dev.write(bytes(440))
        res = run_build(vol, "--boot-timeout", "15", "bootcheck", timeout=600)
        assert res.rc != 0
        # The protective MBR still carries the 0x55AA signature, so SeaBIOS jumps into the zeroed
        # code and the machine hangs without a word: the time limit ends it. (A disk without the
        # signature makes SeaBIOS give up and reboot, and -no-reboot ends qemu at once.)
        assert ("boot: no SSH login within 15s" in res.stderr
                or "boot: qemu exited before a login" in res.stderr), res.stderr
        assert [(item, status) for item, (status, _) in checks(res).items()] == [("boot", "FAIL")]
    assert_nothing_left(vol)


def test_umount_stops_processes_inside_the_chroot(built) -> None:
    """A process still running inside the image would make umount fail 'busy': it is stopped first."""
    vol, _ = built
    mount_root(vol)
    inside = subprocess.Popen(["chroot", str(vol.work / "root"), "/bin/sleep", "600"])
    try:
        res = run_build(vol, "umount")
        assert res.rc == 0, res.stderr
        assert inside.wait(timeout=60) != 0
        assert vol.mountpoints() == []
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()


def assert_nothing_left(vol: LoopVolume) -> None:
    """No qemu or metadata relay of this volume runs, nothing frozen, no overlay or key left.

    Processes are matched by the volume's run dir, where the overlay, the console, the metadata state
    and the freeze guard's state live: a box another test launches meanwhile drops its copy of this
    volume's root mount (``umount -l …/work/root``, rehearsal.boxes), which is not the boot check's."""
    ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if str(vol.work / "run") in line]
    assert not (vol.work / "run" / "frozen").exists(), "the boot check left the canvas frozen"
    assert not (vol.work / "run" / "bootcheck").exists(), "the overlay and the throwaway key were left"


@contextmanager
def broken(vol: LoopVolume, break_it, touched: list[str]) -> Iterator[LoopVolume]:
    """The built canvas broken in place by ``break_it(root)`` (its root filesystem mounted), and put
    back afterwards, even on failure: each path in TOUCHED (relative to the root; the only ones
    ``break_it`` may change, create or remove) gets its bytes and mode back, or is removed if it did
    not exist; then verify must pass again. The boot check boots a qcow2 overlay of the frozen canvas
    and never writes it, so nothing else changes.

    Not a copy of the canvas: it would carry the same XFS UUID, and the kernel refuses to mount it
    while the original's filesystem is alive anywhere, e.g. in the private mount namespace of a box
    (rehearsal.boxes) that another test launched while the original was mounted.

    After breaking, the root is unmounted. XFS writes the partition past the whole-disk device's page
    cache, where an earlier boot's qemu left the blocks it read: the boot check drops that
    cache (BLKFLSBUF) before it starts qemu, else the guest would read stale blocks (seen before that
    fix: the old grub.cfg and "Metadata corruption detected"). These breakages prove it does."""
    mount_root(vol)
    root = vol.work / "root"
    saved = {rel: ((root / rel).read_bytes(), (root / rel).stat().st_mode) if (root / rel).exists() else None
             for rel in touched}
    try:
        break_it(root)
        assert run_build(vol, "umount").rc == 0
        yield vol
    finally:
        mount_root(vol)
        for rel, kept in saved.items():
            path = root / rel
            if kept is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(kept[0])
                path.chmod(kept[1])
    assert verify(vol).rc == 0, "the canvas was not put back as built"


def boot_check(vol: LoopVolume) -> BuildResult:
    """The bootcheck phase alone (a generous limit: TCG on 2 shared cores)."""
    return run_build(vol, "--boot-timeout", "900", "bootcheck", timeout=1500)


def only_failures(res: BuildResult, *items: str) -> dict[str, str]:
    """Assert ITEMS (in instance-check's order) are exactly the failed checks, nothing else blamed,
    and the phase names them; return item -> detail."""
    got = checks(res)
    failed = {i: d for i, (status, d) in got.items() if status == "FAIL"}
    assert list(failed) == list(items), got
    assert res.rc != 0
    assert "phase bootcheck failed" in res.stderr and f"bootcheck: {' '.join(items)}" in res.stderr
    return failed


def only_failure(res: BuildResult, item: str) -> str:
    """Assert ITEM is the one failed check (nothing else blamed) and return its detail."""
    return only_failures(res, item)[item]


def test_breakage_initramfs_without_nvme(built) -> None:
    """The kernel gets no NVMe driver at boot: the root disk never appears, the check names the boot.

    The cloud kernel builds nvme in, so no initramfs can lack it; ``initcall_blacklist=nvme_init``
    keeps the built-in driver from starting, which is what a modular kernel with an initramfs
    without nvme does on a Nitro instance."""
    vol, _ = built

    def no_nvme(root: Path) -> None:
        cfg = root / "boot/grub/grub.cfg"
        cfg.write_text(cfg.read_text().replace(" ro ", " ro initcall_blacklist=nvme_init "))

    with broken(vol, no_nvme, ["boot/grub/grub.cfg"]) as broke:
        res = boot_check(broke)
        detail = only_failure(res, "boot")
        assert "root device never appeared" in detail
        # the console tail reaches the task log (the last lines of the phase log)
        assert "----- end of serial console -----" in res.other_stdout[-1]
        assert_nothing_left(broke)


def test_breakage_root_on_a_loop_device(built) -> None:
    """grub.cfg with root=/dev/loopXp2: the kernel command line check fails from the console."""
    vol, _ = built
    uuid = root_uuid(vol)

    def loop_root(root: Path) -> None:
        cfg = root / "boot/grub/grub.cfg"
        cfg.write_text(cfg.read_text().replace(f"root=UUID={uuid}", "root=/dev/loop0p2"))

    with broken(vol, loop_root, ["boot/grub/grub.cfg"]) as broke:
        res = boot_check(broke)
        detail = only_failure(res, "kernel-cmdline")
        assert f"the kernel got root=/dev/loop0p2, the image intends root=UUID={uuid}" in detail
        assert_nothing_left(broke)


def test_breakage_cloud_init_without_datasource(built) -> None:
    """No datasource: cloud-init never reads the metadata (no key, no login); named cloud-init."""
    vol, _ = built

    def no_datasource(root: Path) -> None:
        (root / "etc/cloud/cloud.cfg.d/90-amibake.cfg").write_text("datasource_list: [ None ]\n")

    with broken(vol, no_datasource, ["etc/cloud/cloud.cfg.d/90-amibake.cfg"]) as broke:
        res = boot_check(broke)
        detail = only_failure(res, "cloud-init")
        assert "datasource 'DataSourceNone', not Ec2" in detail
        assert_nothing_left(broke)


def test_breakage_growpart_missing_a_baked_host_key_and_the_el7_branch(built) -> None:
    """Two independent breakages share one boot, as instance-check reports every item: each is
    caught by the check that names it, and nothing else fails.

    - Without growpart the root stays at the image size: root-grew fails ("growpart did not grow").
    - A host key left in the image: host-keys fails naming its fingerprint (every instance would
      share the private key).
    - The same image says it is EL (``ID_LIKE`` in /etc/os-release), so instance-check runs its EL7
      branch on this Debian guest: every other item still passes and the SELinux items say "not
      applicable" (no SELinux policy in this image), never a silent pass."""
    vol, _ = built
    baked: list[str] = []  # the fingerprint of the baked key

    def no_growpart_baked_key_and_el(root: Path) -> None:
        (root / "usr/bin/growpart").unlink()
        os_release = (root / "etc/os-release").resolve()  # a relative link to ../usr/lib/os-release
        assert os_release == root / "usr/lib/os-release"
        os_release.write_text(os_release.read_text() + 'ID_LIKE="rhel fedora"\n')
        key = root / "etc/ssh/ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        baked.append(subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"],
                                    capture_output=True, text=True, check=True).stdout.split()[1])

    touched = ["usr/bin/growpart", "usr/lib/os-release", "etc/ssh/ssh_host_ed25519_key",
               "etc/ssh/ssh_host_ed25519_key.pub"]
    with broken(vol, no_growpart_baked_key_and_el, touched) as broke:
        res = boot_check(broke)
        failed = only_failures(res, "root-grew", "host-keys")
        assert "growpart did not grow the root partition" in failed["root-grew"]
        (fingerprint,) = baked
        assert fingerprint in failed["host-keys"]
        got = checks(res)
        assert list(got) == RECIPE_ITEMS  # booted without the bundle: no smoke check
        assert got["selinux-enforcing"][0] == got["selinux-labels"][0] == "not applicable"
        assert "no SELinux policy in this image" in got["selinux-labels"][1]
        log = (broke.work / "logs" / "bootcheck.log").read_text(errors="replace")
        assert "(family el)" in log
        assert_nothing_left(broke)


def test_a_failing_provisioning_script_names_itself_and_its_exit_code(built, tmp_path: Path) -> None:
    """The provision phase alone, on the built image, with a definition whose script exits 3: the
    failure names the script and its code (the line the task log shows), the script's output is in the
    phase log, and nothing stays mounted."""
    vol, _ = built
    folder = tmp_path / "images"
    (folder / "failing" / "scripts").mkdir(parents=True)
    script = folder / "failing" / "scripts" / "20-fails.sh"
    script.write_text("#!/bin/sh\necho about to fail\nexit 3\n")
    script.chmod(0o755)
    (folder / "failing.yaml").write_text(
        yaml.safe_dump({"name": "failing", "recipe": "debian12", "scripts": ["20-fails.sh"]})
    )
    definition.render_bundle(definition.load(folder / "failing.yaml"), tmp_path / "image")
    res = run_build(vol, "--image-dir", str(tmp_path / "image"), "--build-id", BUILD_ID, "provision")
    assert res.rc != 0
    assert "provision: script scripts/20-fails.sh failed with exit code 3" in res.stderr, res.stderr
    assert "about to fail" in (vol.work / "logs" / "provision.log").read_text()
    assert vol.mountpoints() == []


def test_verify_finds_a_password_left_in_a_file_or_in_free_blocks(built, bundle) -> None:
    """verify's password search on the built image, with the credentials handed over again: a file
    holding the password is named; once that file is deleted (its blocks not overwritten, as clean
    would) the raw canvas bytes still hold it: "free blocks". Each failure unmounts and forgets."""
    vol, _ = built
    image_dir, _ = bundle
    options = ["--image-dir", str(image_dir), "--build-id", BUILD_ID]
    line = f"{images.REPO_NAME}\t{REPO_USER}\t{REPO_PASSWORD}\n"
    leak = vol.work / "root" / "root" / "leaked-note"
    for deleted in (False, True):
        assert run_build(vol, *options, "credentials", stdin=line).rc == 0
        assert run_build(vol, *options, "mount").rc == 0
        with open(leak, "w") as note:
            note.write(f"repository password: {REPO_PASSWORD}\n")
            note.flush()
            os.fsync(note.fileno())
        if deleted:
            leak.unlink()
        res = run_build(vol, *options, "verify")
        assert res.rc != 0
        expected = "in the canvas's raw bytes (free blocks)" if deleted else "in the image: /root/leaked-note"
        log = (vol.work / "logs" / "verify.log").read_text()
        assert f"verify: FAIL: a repository password is {expected}" in log, res.stderr
        assert REPO_PASSWORD not in res.stderr + "\n".join(res.other_stdout)
        assert vol.mountpoints() == []
        assert not list((vol.work / "run").glob("credentials*")), "the box kept the credentials"
