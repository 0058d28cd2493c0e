"""Start the tinv-gui web page: `python app.py` (GRADIO_SERVER_PORT chooses the port)."""

import sys

from tinv_gui.ui.host import HostSettingError, check_host_settings

# A host's TINV_GUI_* setting that cannot be meant stops the start here, saying which and what
# it takes, before anything heavy loads (README, "Running on Hugging Face Spaces").
try:
    check_host_settings()
except HostSettingError as error:
    sys.exit(f"tinv-gui cannot start; set these environment variables right, or unset them:\n{error}")

from tinv_gui.ui.app import launch  # noqa: E402 - after the check

if __name__ == "__main__":
    launch()
