"""The restaurant's reservation desk: rules (persona data), the bookings table and its tools."""
