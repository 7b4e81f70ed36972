"""Serving the app to many visitors at once, safely.

- :mod:`.settings`: the operator's settings (environment variables or ``.streamlit/phpn.toml``).
- :mod:`.cost`: what one forward pass of a model costs, and the limits on a model input.
- :mod:`.isolation`: the switch for visitors' code (off by default) and its trial in the jail.
- :mod:`.jail`: the bubblewrap jail and :class:`JailedModel`, the server's side of a worker
  (:mod:`.worker`) that holds a visitor's model.
- :mod:`.workspace`: a private workspace per visitor (uploads, saved runs), quotas, and the
  sweep that deletes idle workspaces.
- :mod:`.shares`: read-only share links to one saved run, revocable by the visitor who made them.
- :mod:`.paths`: which server paths a visitor may name, which runs they may list and open,
  where they may save, and messages with server paths redacted.

None of this imports Streamlit; the app's pages call it.
"""
from phpn.app.serving.cost import (
                        ForwardCost,
                        check_forward_cost,
                        check_input_pixels,
                        largest_side,
                        measure_cost,
)
from phpn.app.serving.isolation import (
                        CODE_OFF_MESSAGE,
                        ENABLE_HINT,
                        check_request_pixels,
                        code_allowed,
                        isolated,
                        jailed_session,
                        jailed_worker,
                        open_jailed,
                        open_jailed_session,
                        require_code_allowed,
                        stop_jailed,
                        try_in_child_process,
)
from phpn.app.serving.jail import JailedModel, jail_problem
from phpn.app.serving.paths import (
                        check_confined,
                        may_read,
                        read_only_reason,
                        readable_runs,
                        redact_paths,
                        run_save_target,
                        visitor_path,
)
from phpn.app.serving.settings import (
                        SETTINGS,
                        ServerSettings,
                        load_settings,
                        settings_table,
)
from phpn.app.serving.shares import (
                        Share,
                        create_share,
                        list_shares,
                        open_share,
                        revoke_share,
                        sweep_shares,
                        token_digest,
)
from phpn.app.serving.workspace import (
                        Workspace,
                        folder_size,
                        human_size,
                        is_within,
                        new_browser_key,
                        removed_on_error,
                        sweep_idle,
                        workspace_id,
                        workspace_root,
)

__all__ = [
    "CODE_OFF_MESSAGE", "ENABLE_HINT", "ForwardCost", "JailedModel", "SETTINGS", "ServerSettings", "Share", "Workspace",
    "check_confined", "check_forward_cost", "check_input_pixels", "check_request_pixels", "code_allowed", "create_share", "folder_size",
    "human_size", "is_within", "isolated", "jail_problem", "jailed_session", "jailed_worker", "largest_side", "list_shares", "load_settings",
    "may_read", "measure_cost", "new_browser_key", "open_jailed", "open_jailed_session", "open_share", "read_only_reason",
    "readable_runs", "redact_paths", "removed_on_error", "require_code_allowed", "revoke_share", "run_save_target",
    "settings_table", "stop_jailed", "sweep_idle", "sweep_shares", "token_digest", "try_in_child_process",
    "visitor_path", "workspace_id", "workspace_root",
]
