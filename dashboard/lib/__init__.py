"""Pure library code behind the dashboard pages (no Streamlit imports, so it is tested directly)."""
