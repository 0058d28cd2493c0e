"""The Gradio app: tabs that build settings, submit jobs to the shared engine and follow their events."""
