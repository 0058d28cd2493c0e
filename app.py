"""Start the tinv-gui web page: `python app.py` (GRADIO_SERVER_PORT chooses the port)."""

from tinv_gui.ui.app import launch

if __name__ == "__main__":
    launch()
