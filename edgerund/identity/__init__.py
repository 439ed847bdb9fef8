"""edgerund.identity"""
