"""edgerund.updates"""
