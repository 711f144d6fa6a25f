"""Settings: the documented TOML works as written, env overrides, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_keeps_its_data_in_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config/dicom-node.toml loads; its ``~`` paths expand to the user's home, outside
    the repository (patient data never lands in a git work tree)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings(REPO / "config" / "dicom-node.toml")
    data = tmp_path / ".local" / "share" / "dicom-node"
    assert s.listener.ae_title == "DICOM_NODE"
    assert s.listener.port == 11112
    assert s.storage.root == data / "spool"
    assert s.database.url == f"sqlite:///{data / 'dicom-node.db'}"
    assert s.broker.url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert s.broker.embedded and s.run_in_process_worker
    assert s.completion.idle_seconds == 5
    assert s.destination("archive").port == 4242
    assert s.rules[0].match == {"Modality": "CT"} and s.rules[0].models == ["ct-tissue"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """Relative storage and sqlite paths resolve next to the configuration file, not the cwd."""
    cfg = tmp_path / "etc" / "node.toml"
    cfg.parent.mkdir()
    cfg.write_text('[storage]\nroot = "var/spool"\n[database]\nurl = "sqlite:///var/node.db"\n'
                   '[broker]\nurl = "sqla+sqlite:///var/broker.db"\n')
    s = load_settings(cfg)
    assert s.storage.root == cfg.parent / "var" / "spool"
    assert s.database.url == f"sqlite:///{cfg.parent / 'var' / 'node.db'}"
    assert s.broker.url == f"sqla+sqlite:///{cfg.parent / 'var' / 'broker.db'}"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DICOM_NODE_<SECTION>__<KEY> overrides the file, lists come as JSON."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[listener]\nport = 104\n[broker]\nurl = "sqla+sqlite:///b.db"\n')
    monkeypatch.setenv("DICOM_NODE_LISTENER__PORT", "11999")
    monkeypatch.setenv("DICOM_NODE_LISTENER__ALLOWED_CALLING_AE_TITLES", '["CT1", "PACS"]')
    monkeypatch.setenv("DICOM_NODE_BROKER__URL", "redis://127.0.0.1:6379/0")
    s = load_settings(cfg)
    assert s.listener.port == 11999
    assert s.listener.allowed_calling_ae_titles == ["CT1", "PACS"]
    assert s.broker.url == "redis://127.0.0.1:6379/0"
    assert not s.run_in_process_worker


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[listener]\nport = 'abc'\n", r"listener\.port: .*valid integer.*'abc'"),
        ("[listener]\nportt = 1\n", r"listener\.portt: unknown key"),
        ("[nonsense]\nx = 1\n", r"nonsense: unknown key"),
        ("[listener]\nae_title = 'THIS_TITLE_IS_TOO_LONG'\n", r"listener\.ae_title: .*1-16"),
        (
            "[[rules]]\nname='r'\nmodels=['ct-tissue']\ndestinations=['nowhere']\n",
            r"unknown destinations \['nowhere'\]",
        ),
        ("[[rules]]\nname='r'\nmodels=['m']\nmatch={Colour='red'}\n", r"cannot match on 'Colour'"),
        ("[[rules]]\nname='r'\nmodels=['m']\nmatch={SeriesDescription='/([/'}\n", r"bad regular expression"),
        ("[listener\n", r"not valid TOML"),
        ("[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=104\ncommitment='storage'\n",
         r"destinations\.0\.commitment: .*'none', 'find' or 'storage-commitment'"),
        ("[[destinations]]\nname='w'\ntype='dicomweb'\nurl='https://pacs/dicom-web'\ncommitment='find'\n",
         r"commitment \"find\" needs type dicom"),
        ("[[destinations]]\nname='w'\ntype='dicomweb'\nurl='https://pacs/dicom-web'\n"
         "commitment='storage-commitment'\n",
         r"commitment \"storage-commitment\" needs type dicom"),
        ("[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=104\ncommitment='storage-commitment'\n"
         "commitment_max_requests=0\n",
         r"destinations\.0\.commitment_max_requests: .*greater than or equal to 1"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    """A wrong key or type raises ConfigError with one line naming the key."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(cfg)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A configuration path that does not exist is reported as such."""
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "nope.toml")


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    """derived_uid gives the same valid UID for the same parts and different ones otherwise."""
    from dicom_node.uids import derived_uid, is_valid_uid

    a = derived_uid("1.2.3", "ct-tissue", "1.0.0", "seg")
    assert a == derived_uid("1.2.3", "ct-tissue", "1.0.0", "seg")
    assert a != derived_uid("1.2.3", "ct-tissue", "1.0.1", "seg")
    assert is_valid_uid(a) and a.startswith("2.25.")


def test_required_client_certificates_need_a_ca(tmp_path: Path) -> None:
    """Requiring client certificates without naming the CA that signs them is a config error."""
    cfg = tmp_path / "tls.toml"
    cfg.write_text('[listener.tls]\ncertificate = "c.pem"\nprivate_key = "k.pem"\nrequire_client_certificate = true\n')
    with pytest.raises(ConfigError, match=r"listener\.tls: .*needs ca_certificates"):
        load_settings(cfg)


def test_find_defaults_to_the_destination_itself(tmp_path: Path) -> None:
    """``commitment = "find"`` queries the destination unless ``find_*`` name another query SCP."""
    cfg = tmp_path / "find.toml"
    cfg.write_text("[[destinations]]\nname='a'\nae_title='STORE'\nhost='pacs'\nport=104\ncommitment='find'\n"
                   "[[destinations]]\nname='b'\nae_title='STORE'\nhost='pacs'\nport=104\ncommitment='find'\n"
                   "find_ae_title='QUERY'\nfind_port=105\n")
    a, b = load_settings(cfg).destinations
    assert (a.commitment, a.find_delay_seconds) == ("find", 2.0)
    assert (a.query_scp.ae_title, a.query_scp.host, a.query_scp.port) == ("STORE", "pacs", 104)
    assert (b.query_scp.ae_title, b.query_scp.host, b.query_scp.port) == ("QUERY", "pacs", 105)
