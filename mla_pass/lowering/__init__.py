"""Program → program passes that prepare a decode-step program for export."""
